"""Why an initialisation works: spectra, effective rank, cosine maps and RSA of the new-token rows."""
