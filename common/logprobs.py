"""Log probabilities of generated tokens, as they travel from the engine to the gateway.

One `Logprobs` covers the tokens of one message (a FirstToken, a TokenUpdate, a gateway TokenEvent),
in the same order as its token ids: per token, the log probability of the token itself and its top-N
alternatives (N is the request's `SamplingParams.logprobs`, possibly 0), most likely first. The values
are what the engine's sampler computes (`docs/sampling.md`: log_softmax of the model's raw logits);
token strings are the gateway's business, so only ids travel. Array-like: a compact msgpack array.
"""

from __future__ import annotations

import msgspec


class Logprobs(msgspec.Struct, array_like=True):
    token_logprobs: list[float] = []  # one per token
    top_token_ids: list[list[int]] = []  # one list per token: its top-N alternatives, best first
    top_logprobs: list[list[float]] = []  # their log probabilities, in the same order

    def __len__(self) -> int:
        return len(self.token_logprobs)

    def extend(self, other: Logprobs) -> None:
        """Append the tokens of `other` (the next tokens of the same request)."""
        self.token_logprobs += other.token_logprobs
        self.top_token_ids += other.top_token_ids
        self.top_logprobs += other.top_logprobs

    def head(self, n: int) -> Logprobs:
        """The first `n` tokens (a stop string ended the request inside a message)."""
        return Logprobs(self.token_logprobs[:n], self.top_token_ids[:n], self.top_logprobs[:n])
