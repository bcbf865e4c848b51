"""lineside.devices: target box profiles (*.yaml) and the host probe."""
