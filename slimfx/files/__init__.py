"""User-file formats and specs: safe model files, MODEL specs, --calib data files."""
