"""The denoising cascade: networks, losses, simulation, data, training, inference."""
