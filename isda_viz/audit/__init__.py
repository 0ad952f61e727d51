"""The copy audit: a FAISS nearest-neighbour index of the training set (cached), its calibration
(copy score), and the audit run."""

from isda_viz.audit.run import AuditConfig, AuditResult, run_audit

__all__ = ["AuditConfig", "AuditResult", "run_audit"]
