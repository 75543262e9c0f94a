"""Evaluation: labels, frozen representations, probes, metrics with bootstrap CIs, and EHR strata."""
