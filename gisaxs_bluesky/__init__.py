"""gisaxs-bluesky: live denoising-autoencoder binning of GISAXS frames in Bluesky and Tiled."""

__version__ = "0.1.0"
