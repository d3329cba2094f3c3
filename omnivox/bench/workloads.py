"""The workload file format lives in omnivox/workload.py (the server reads it too); bench code imports it here."""

from omnivox.workload import STANDARD_WORKLOAD, WARMUP_ID, WorkloadItem, load_workload, split_warmup

__all__ = ["STANDARD_WORKLOAD", "WARMUP_ID", "WorkloadItem", "load_workload", "split_warmup"]
