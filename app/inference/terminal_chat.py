"""The terminal chat behind `make chat` (predict INTERACTIVE=1).

Its own module so that predict.py stays about answering prompts, and because a chat has
concerns a single prompt has not: commands (/help, /reset, /exit), a transcript that log lines
must not break up, and a history that grows until it no longer fits the model's context.

Quitting takes an explicit /exit (or /quit) or Ctrl-D: a stray Enter re-prompts instead of
ending a conversation the user may have spent a while on. When the history plus MAX_NEW_TOKENS
would overflow the context, the oldest turns go first, and the user is told, since the model
then no longer sees them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from app.data.encode import prompt_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from app.config import Config
    from app.inference.generate import CausalLM


class Answerer(Protocol):
    """What the chat needs of app.inference.predict.Predictor (a Protocol, so this module, which predict
    calls, does not import predict back)."""

    cfg: Config
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase

    def generate(self, messages: list[dict[str, str]], stream: bool = False) -> str: ...


log = logging.getLogger(__name__)

Message = dict[str, str]

BANNER = "chat: type a message; /help lists the commands, /exit or Ctrl-D quits\n"
HELP = (
    "commands:\n"
    "  /help          this list\n"
    "  /reset         forget the conversation so far (the model starts afresh)\n"
    "  /exit, /quit   end the chat (Ctrl-D too)\n"
    "an empty line is ignored; anything else is a message to the model\n"
)
EXIT_COMMANDS = ("/exit", "/quit")
# transformers' VERY_LARGE_INTEGER: a tokenizer that does not know its model's context says this.
_NO_LIMIT = 10**9


def _say(text: str) -> None:
    """A line of the chat's own UI (not the conversation): stderr, so stdout stays the transcript."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")  # cli-output
    sys.stderr.flush()


def context_size(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Tokens the model can attend to: the smaller of its config's position limit and the
    tokenizer's model_max_length (when that is a real number); None when neither is known."""
    config = getattr(model, "config", None)
    sizes = []
    # max_position_embeddings for most families; ChatGLM2/3 remote code says seq_length,
    # ChatGLM-6B max_sequence_length, GPT-2-like models n_positions.
    for attr in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            sizes.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _NO_LIMIT:
        sizes.append(value)
    return min(sizes) if sizes else None


def prompt_tokens(pred: Answerer, messages: list[Message]) -> int:
    """Length of the prompt exactly as Predictor.generate renders and tokenizes it."""
    text = prompt_text(pred.tokenizer, messages)
    # verbose=False: transformers' own too-long warning would precede the one line that refuses it
    return len(pred.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def overflow(pred: Answerer, messages: list[Message], context: int | None, what: str) -> str | None:
    """Why ``messages`` plus MAX_NEW_TOKENS do not fit ``context`` (the rule serve refuses by), ending in the
    fix for ``what`` (the text to shorten); None when they fit or the context is unknown."""
    max_new = pred.cfg.predict.max_new_tokens
    if context is None:
        return None
    n = prompt_tokens(pred, messages)
    if n + max_new <= context:
        return None
    room = context - max_new
    fix = f"shorten {what} to at most {room:,} tokens" if room > 0 else "lower MAX_NEW_TOKENS"
    if 0 < room and n < context:  # a smaller answer budget would do too
        fix += " or lower MAX_NEW_TOKENS"
    return (
        f"is {n:,} tokens with the chat template; the model's context is {context:,} tokens, "
        f"{max_new:,} of them kept for the answer (MAX_NEW_TOKENS={max_new}): {fix}"
    )


def fit(
    pred: Answerer, history: list[Message], message: Message, context: int | None
) -> tuple[list[Message], int] | None:
    """(messages to send, user/assistant pairs dropped from the front) so that the prompt plus
    MAX_NEW_TOKENS fits ``context``; None when even ``message`` alone does not fit."""
    turns = [*history, message]
    if context is None:
        return turns, 0
    budget = context - pred.cfg.predict.max_new_tokens
    dropped = 0
    while prompt_tokens(pred, turns) > budget:
        if len(turns) == 1:
            return None
        turns = turns[2:]  # history is user/assistant pairs: the oldest pair goes as one
        dropped += 1
    return turns, dropped


@contextmanager
def quiet_info() -> Iterator[None]:
    """Raise the app's and the root logger's level to WARNING for the block, restoring both after.

    Per-answer INFO (tokens/s) and library INFO would otherwise land between the answers;
    warnings and errors still show. The level is raised at the loggers, not the handlers, so
    whatever handlers the caller set up (the CLI's, pytest's) keep working unchanged.
    """
    loggers = [logging.getLogger(), logging.getLogger("app")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def chat(pred: Answerer, read: Callable[[str], str] | None = None) -> None:
    """Talk to ``pred`` until /exit, /quit or end of input. ``read`` is input() by default,
    looked up at call time so a patched builtins.input drives the loop too."""
    read = read or input
    context = context_size(pred.model, pred.tokenizer)
    max_new = pred.cfg.predict.max_new_tokens
    history: list[Message] = []
    _say(BANNER)
    with quiet_info():
        while True:
            try:
                line = read("你> ")
            except EOFError:  # Ctrl-D: end the "你> " line so the shell prompt starts on its own
                sys.stdout.write("\n")  # cli-output
                sys.stdout.flush()
                return
            text = line.strip()
            if not text:
                continue
            if text in EXIT_COMMANDS:
                return
            if text == "/help":
                _say(HELP)
                continue
            if text == "/reset":
                history = []
                _say("(history cleared: the next message starts a new conversation)")
                continue
            message = {"role": "user", "content": line}
            fitted = fit(pred, history, message, context)
            if fitted is None:
                _say(f"(not sent: this message {overflow(pred, [message], context, 'it')})")
                continue
            turns, dropped = fitted
            if dropped:
                _say(
                    f"(dropped {dropped} earlier turn{'s' if dropped > 1 else ''}: the conversation plus "
                    f"MAX_NEW_TOKENS={max_new} would not fit the model's {context}-token context)"
                )
            sys.stdout.write("模型> ")  # cli-output
            sys.stdout.flush()
            answer = pred.generate(turns, stream=True)
            history = [*turns, {"role": "assistant", "content": answer}]
