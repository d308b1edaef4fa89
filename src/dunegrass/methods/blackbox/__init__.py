"""Daunce for models behind a fine-tuning service: the back-end interface and its implementations."""

from .base import BlackBoxBackend
from .daunce import BlackBoxDaunce
from .local import LocalBackend
from .local_chat import LocalChatBackend
from .openai_api import OpenAICompatibleBackend, PromptCompletions

__all__ = [
    "BlackBoxBackend",
    "BlackBoxDaunce",
    "LocalBackend",
    "LocalChatBackend",
    "OpenAICompatibleBackend",
    "PromptCompletions",
]
