"""Which objects become jobs: the skip rules, shared by the Lambda handler and the bulk CLI.

Every rule returns a stable snake_case reason (logged, printed by the bulk CLI, and used as the
``Reason`` dimension of the ``ObjectsSkipped`` metric). Rules that need only the key run first
(:func:`key_skip_reason`) so that the handler never calls HeadObject for an object it would
skip anyway; the size rules (:func:`size_skip_reason`) run once the size is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from submitter.settings import SubmitterSettings

#: The audio/video containers the worker decodes. THE list: nothing else spells it out.
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {"wav", "flac", "ogg", "mp3", "m4a", "mp4", "aac", "webm", "opus"}
)

# Skip reasons (values of the ``Reason`` metric dimension).
UNDER_OUTPUT_PREFIX = "under_output_prefix"
OUTSIDE_INPUT_PREFIX = "outside_input_prefix"
FOLDER_PLACEHOLDER = "folder_placeholder"
UNSUPPORTED_EXTENSION = "unsupported_extension"
EMPTY_OBJECT = "empty_object"
TOO_LARGE = "too_large"
#: Not a rule: the same bucket/key/ETag was already submitted (idempotency record found).
DUPLICATE = "duplicate"
#: Not a rule: HeadObject (needed when the event lacks size/ETag) found no object: deleted since.
NOT_FOUND = "not_found"
#: Not a rule: an S3 event that is not an object creation (e.g. ObjectRemoved), or a test event.
NOT_OBJECT_CREATED = "not_object_created"

def extension(key: str) -> str:
    """Lower-cased extension of the key's basename (``""`` if none): ``a/B.MP3`` -> ``mp3``."""
    base = key.rsplit("/", 1)[-1]
    if "." not in base.lstrip("."):
        return ""
    return base.rsplit(".", 1)[-1].lower()


def is_supported(key: str) -> bool:
    return extension(key) in SUPPORTED_EXTENSIONS


def key_skip_reason(key: str, settings: SubmitterSettings) -> str | None:
    """Reason to skip ``key`` judging by the key alone, or ``None``.

    The output-prefix rule comes first: the worker's own outputs must never become jobs,
    whatever the input prefix is (they may well lie under it when INPUT_PREFIX is empty).
    """
    if key.startswith(settings.output_prefix):
        return UNDER_OUTPUT_PREFIX
    if not key.startswith(settings.input_prefix):
        return OUTSIDE_INPUT_PREFIX
    if key.endswith("/"):
        return FOLDER_PLACEHOLDER
    if not is_supported(key):
        return UNSUPPORTED_EXTENSION
    return None


def size_skip_reason(size: int, settings: SubmitterSettings) -> str | None:
    """Reason to skip an object of ``size`` bytes, or ``None``."""
    if size <= 0:
        return EMPTY_OBJECT
    if size > settings.max_object_bytes:
        return TOO_LARGE
    return None


def skip_reason(key: str, size: int | None, settings: SubmitterSettings) -> str | None:
    """All rules; ``size=None`` checks the key rules only."""
    reason = key_skip_reason(key, settings)
    if reason is None and size is not None:
        reason = size_skip_reason(size, settings)
    return reason
