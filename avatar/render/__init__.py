"""Lower-face renderer: a conditional denoiser (nn.Module), its schedule and samplers (plain functions),
and the conditioning inputs (masked target, references, landmark sketch)."""
