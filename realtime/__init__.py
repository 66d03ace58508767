"""Live use: the streaming engine (`engine`), the WebSocket server with its browser page (`server`),
a Python client (`client`) and the webcam avatar (`webcam`)."""
