"""Domain errors about adapters; the HTTP layer maps each to one status in one place."""


class AdapterError(Exception):
    """Base class: the message names the problem and the offending value."""


class InvalidAdapter(AdapterError):
    """The files are not a servable PEFT adapter for this base model (bad config, shapes, values)."""


class AdapterNotFound(AdapterError):
    """No adapter of that name is registered."""


class AdapterExists(AdapterError):
    """An adapter of that name is already registered or stored."""


class StoreFull(AdapterError):
    """The store holds as many adapters as it may (--max-adapters): a new one is refused."""


class SourceUnavailable(AdapterError):
    """Where adapters come from (the S3 store, the Hugging Face hub) cannot be reached or refused
    the operation; the message names the store or hub and the cause."""


class AdapterTooLarge(AdapterError):
    """An adapter's files are larger than the server accepts (--max-upload-bytes)."""


class FetchForbidden(AdapterError):
    """Fetching this adapter from where the request asks is not allowed for this request (a hub
    repo neither in --allow-hub-adapters nor asked for with the admin key)."""


class InvalidTask(AdapterError, ValueError):
    """A request's task does not fit its adapter: missing for a multitask adapter, out of its range,
    or given for an adapter without tasks. The API reports it against `adapter_task`."""
