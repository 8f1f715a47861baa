"""The floor every stage stands on: the run configuration's models (config; users import them
as compo.config), errors and exit codes (errors), fault injection for the reliability tests
(faults), console output (progress), secret redaction (redact), torch.distributed helpers (dist,
commstats), atomic run-directory files (rundir), what compo's own files must hold (files),
config fingerprints (fingerprint) and experiment trackers (tracking). It imports nothing else of
compo; everything else in compo may import it."""
