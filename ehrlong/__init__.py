"""ehrlong: long-context foundation models on electronic health records (MEDS)."""

__version__ = "0.1.0"
