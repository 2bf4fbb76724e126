"""Infrastructure with no MAE-specific logic: processes, files, RNG, meters, errors."""
