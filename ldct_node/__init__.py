"""ldct-node: a DICOM node that denoises low-dose CT series."""

__version__ = "0.1.0"
