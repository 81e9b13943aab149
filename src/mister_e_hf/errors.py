"""The toolkit's error types. Every problem a user can fix is one of these, with a message that names the file,
conversation and turn (or utterance) at fault and what is wrong; anything else escaping the toolkit is a bug.

All derive from `MisterEError`, itself a `ValueError`, so `except ValueError` keeps working.
"""


class MisterEError(ValueError):
    """Base of every error the toolkit raises on bad input, data, settings or training state."""


class ConversationInputError(MisterEError):
    """Bad input to the processor or the model. The message names the conversation and utterance (their positions in
    the batch), which are also kept as `conversation` and `utterance`, and the problem as `detail`. Callers that know
    more (a file, a conversation id, a turn number) re-raise it with `named("conversation 'dia3', turn 2")`."""

    def __init__(self, detail: str, conversation: int | None = None, utterance: int | None = None,
                 where: str | None = None):
        self.detail, self.conversation, self.utterance, self.where = detail, conversation, utterance, where
        if where is None and conversation is not None:
            where = f"conversation {conversation}" + (f", utterance {utterance}" if utterance is not None else "")
        super().__init__(f"{where}: {detail}" if where else detail)

    def named(self, where: str) -> "ConversationInputError":
        """The same error, located in the caller's words instead of batch positions."""
        return type(self)(self.detail, self.conversation, self.utterance, where)

    def __reduce__(self):  # picklable across processes (DataLoader workers) with its fields
        return type(self), (self.detail, self.conversation, self.utterance, self.where)


class CorpusError(MisterEError):
    """A corpus or manifest does not look as expected; the message names the file, line, conversation or label."""


class CacheError(MisterEError):
    """An embedding-cache entry or shard cannot be trusted (failed integrity check, non-finite values)."""


class TrainingError(MisterEError):
    """Training cannot go on, or cannot start: non-finite loss or gradients, or data that cannot train a model."""


__all__ = ["MisterEError", "ConversationInputError", "CorpusError", "CacheError", "TrainingError"]
