"""Preference data, from file to token ids: readers per file format (readers, oasst), the
normalised rows (rows), one record to one row (normalise), loading a data set (load), the
embedded toy task (toy), injected label noise (noise), tokenising (encode) and padded pair
batches (pair_batch). It may import compo.core."""
