"""Good-only detection: the method rule (:mod:`~qi.anomaly.method`) and the detector's fit
(:mod:`~qi.anomaly.fitting`). The network itself is :mod:`qi.models.patchcore`."""
