"""MEDS data: reading and validation, the synthetic cohort, public datasets, and the token store."""
