"""``GET /metrics``: the engine's counters, read at scrape time from its last snapshot.

The prefix-cache counters go out under vLLM's names (``vllm:prefix_cache_queries_total``,
``vllm:prefix_cache_hits_total``, in tokens) and this engine's own (``prefix_cache_*_total``,
as ``LLM.prefix_cache_metrics`` writes them), with vLLM's request gauges and a few of the
engine's: blocks in use, and the largest batch one step has sampled.
"""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.serve.loop import EngineLoop


class EngineCollector(Collector):
    def __init__(self, engine: EngineLoop, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        snapshot = self.engine.snapshot
        stats = snapshot.stats
        labels = ["model_name"]
        values = [self.model_name]

        def family(kind, name: str, help_text: str, value: float):
            metric = kind(name, help_text, labels=labels)
            metric.add_metric(values, value)
            return metric

        yield family(CounterMetricFamily, "vllm:prefix_cache_queries",
                     "Prefix cache queries, in terms of number of queried tokens.", stats.queries)
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits",
                     "Prefix cache hits, in terms of number of cached tokens.", stats.hits)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     stats.queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.hits)
        yield family(CounterMetricFamily, "prefix_cache_requests", "Requests looked up in the prefix cache.",
                     stats.requests)
        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
                     snapshot.num_running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     snapshot.num_waiting)
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     snapshot.num_used_blocks / snapshot.num_blocks)
        yield family(GaugeMetricFamily, "engine_kv_blocks_used", "KV blocks held by requests (not free).",
                     snapshot.num_used_blocks)
        yield family(GaugeMetricFamily, "engine_kv_blocks", "KV blocks in the pool.", snapshot.num_blocks)
        yield family(CounterMetricFamily, "engine_steps", "Engine steps run.", snapshot.num_steps)
        yield family(GaugeMetricFamily, "engine_max_step_batch_size",
                     "The most requests that sampled a token in one engine step since the server started.",
                     snapshot.max_step_batch)


def metrics_registry(engine: EngineLoop, model_name: str) -> CollectorRegistry:
    """A registry of its own per server, so that servers in one process never clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
