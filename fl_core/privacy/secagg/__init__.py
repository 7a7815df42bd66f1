"""Secure aggregation: fixed-point ring encoding, AES-CTR masks, Bonawitz et al. 2017 protocol, in-process rounds."""

from fl_core.privacy.secagg.encoding import FixedPoint
from fl_core.privacy.secagg.protocol import SecAggClient, SecAggError, SecAggServer
from fl_core.privacy.secagg.simulation import SecAggReport, secure_sum, threshold_for

__all__ = ["FixedPoint", "SecAggClient", "SecAggError", "SecAggReport", "SecAggServer", "secure_sum", "threshold_for"]
