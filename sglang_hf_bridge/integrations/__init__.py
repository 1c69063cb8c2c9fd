"""Engine-backed models under other libraries' model objects (sentence-transformers)."""
