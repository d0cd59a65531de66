"""Soft-prompt adapter kinds, PEFT file loading and validation, materialization, store and registry."""

from .adapter import Adapter
from .base import KINDS, AdapterKind
from .errors import (AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge, FetchForbidden, InvalidAdapter,
                     SourceUnavailable, StoreFull)
from .loading import CONFIG_FILE, WEIGHTS_FILE, content_version, load_adapter, read_adapter_dir
from .registry import AdapterRegistry
from .spec import ModelSpec
from .store import AdapterStore, Store, check_name, open_store

__all__ = [
    "Adapter", "AdapterError", "AdapterExists", "AdapterKind", "AdapterNotFound", "AdapterRegistry",
    "AdapterStore", "AdapterTooLarge", "CONFIG_FILE", "FetchForbidden", "InvalidAdapter", "KINDS", "ModelSpec",
    "SourceUnavailable", "Store", "StoreFull", "WEIGHTS_FILE", "check_name", "content_version", "load_adapter",
    "open_store", "read_adapter_dir",
]
