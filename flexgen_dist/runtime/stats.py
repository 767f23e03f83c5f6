"""What a generation measured: times, tokens, peak bytes per tier, waits."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    prefill_time: float = 0.0
    decode_time: float = 0.0
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # generated after the first token (the prefill produces one)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    io_wait: float = 0.0
    comm_wait: float = 0.0  # time this rank waited for its input from the ring

    @property
    def total_throughput(self) -> float:
        return self.generated_tokens / max(self.prefill_time + self.decode_time, 1e-9)

    def as_dict(self) -> dict:
        t = self.prefill_time + self.decode_time
        return {
            "prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_latency_s": self.prefill_time,
            "prefill_throughput": self.prompt_tokens / max(self.prefill_time, 1e-9),
            "decode_latency_s": self.decode_time,
            "decode_throughput": self.decode_tokens / max(self.decode_time, 1e-9),
            "total_latency_s": t, "total_throughput": self.total_throughput,
            "io_wait_s": self.io_wait, "comm_wait_s": self.comm_wait, "peak_bytes": self.peak_bytes, "peak_rss_bytes": self.peak_rss_bytes,
        }
