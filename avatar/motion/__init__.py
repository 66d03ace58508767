"""Motion model: speech (mel windows) → mouth and jaw landmarks of a given person."""
