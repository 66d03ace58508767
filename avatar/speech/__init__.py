"""The pretrained speech encoder (Whisper tiny.en's encoder, exported to ONNX by `training.export_speech`):
its log-mel front-end, batch and streaming features (`avatar.speech.encoder`)."""
