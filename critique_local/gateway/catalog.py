"""The model catalog: the built-in scripted model plus the models declared in config."""

from __future__ import annotations

from dataclasses import dataclass

from critique_local.config import Settings
from critique_local.gateway.scripted import MODEL_ID as SCRIPTED_ID


@dataclass(frozen=True)
class ModelEntry:
    id: str
    name: str
    provider: str | None  # None: served in-process (critique/scripted)
    upstream_id: str
    context_tokens: int = 128_000
    output_tokens: int = 8192
    input_price: float = 0.0  # credits per million tokens
    output_price: float = 0.0
    plans: tuple[str, ...] = ()  # empty: every plan

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_price + output_tokens * self.output_price) / 1_000_000

    @property
    def free(self) -> bool:
        return self.input_price == 0 and self.output_price == 0

    def allowed_for(self, plan: str) -> bool:
        return not self.plans or plan in self.plans


class Catalog:
    def __init__(self, entries: list[ModelEntry]) -> None:
        self._by_id = {e.id: e for e in entries}

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        entries = [ModelEntry(SCRIPTED_ID, "Scripted (deterministic, offline)", None, SCRIPTED_ID,
                              input_price=settings.models.scripted_input_price,
                              output_price=settings.models.scripted_output_price)]
        for m in settings.catalog:
            if m.provider not in settings.providers:
                raise ValueError(f"catalog model {m.id!r} names unknown provider {m.provider!r}")
            entries.append(ModelEntry(m.id, m.name or m.id, m.provider, m.upstream_id or m.id,
                                      m.context_tokens, m.output_tokens, m.input_price, m.output_price,
                                      tuple(m.plans)))
        return cls(entries)

    def get(self, model_id: str) -> ModelEntry | None:
        return self._by_id.get(model_id)

    def all(self) -> list[ModelEntry]:
        return list(self._by_id.values())
