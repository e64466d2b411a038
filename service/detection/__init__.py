"""Detection of Supermemory keys in arbitrary text, for manual reports and `leak-responder scan`."""

from service.detection.config import DEFAULT, DetectorConfig
from service.detection.finding import Finding
from service.detection.scanner import scan_stream, scan_text

__all__ = ["DEFAULT", "DetectorConfig", "Finding", "scan_stream", "scan_text"]
