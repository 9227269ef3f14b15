"""Data for a run: load the task's splits, partition, tokenize per client, pick the init data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedsb.config import RunConfig
from fedsb.errors import ConfigError, FedsbError, naming_settings
from fedsb.seeding import derive_seed


@dataclass
class PreparedData:
    """Everything data-side the rounds need: per-client loaders, the evaluation set, the init data."""

    task: Any
    clients: dict[str, Any]
    client_sizes: dict[str, int]
    partition_stats: dict[str, Any]
    test: Any
    init_data: Any
    init_info: dict[str, Any] = field(default_factory=dict)


def loader_factory(
    cfg: RunConfig, task: Any, tokenizer: Any, batch_size: int
) -> Callable[[Any], Callable[[int], Any]]:
    """ds -> loader(seed): seeded epochs of padded batches, as the task's format makes them."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def for_dataset(ds: Any) -> Callable[[int], Any]:
        def loader(seed: int) -> Any:
            return task.format.make_loader(
                ds,
                batch_size,
                seed=seed % (2**63),
                pad_token_id=pad_id,
                pad_to_multiple_of=cfg.data.pad_to_multiple,
            )

        return loader

    return for_dataset


def tokenize_task(
    task: Any,
    ds: Any,
    tokenizer: Any,
    max_length: int,
    *,
    cache: bool = False,
    cache_dir: Any = None,
    key: str | None = None,
) -> Any:
    """Tokenize ``ds`` for training as the task's format does; with ``cache``, through the on-disk cache keyed
    by tokenizer, the format's recipe, ``max_length`` and the rows as the task renders them (``key``: that
    key if the caller already computed it, `tokenized_key`)."""

    def build() -> Any:
        return task.format.tokenize(task, ds, tokenizer, max_length)

    if not cache:
        return build()
    from fedsb.data.cache import cached_tokenized

    key = key or tokenized_key(task, ds, tokenizer, max_length)
    return cached_tokenized(key, build, cache_dir=cache_dir)


def tokenized_key(task: Any, ds: Any, tokenizer: Any, max_length: int) -> str:
    """The tokenization cache's key of ``ds``: tokenizer, the format's recipe, ``max_length`` and the rows."""
    from fedsb.data.cache import content_key, tokenizer_fingerprint

    fmt = task.format
    rows = fmt.cache_rows(task, ds)
    return content_key(tokenizer_fingerprint(tokenizer), fmt.recipe, str(max_length), rows)


def model_task(task: Any) -> dict[str, Any]:
    """`load_model` arguments for a task, as its format gives them (a causal LM, or a sequence classifier
    with the task's labels)."""
    return task.format.model_args(task)


_PARTITION_ARGS = {k: f"partition.{k}" for k in ("scheme", "num_clients", "column", "alpha", "min_size")}


def _option_names(task_cls: Any) -> dict[str, str]:
    """A task's constructor arguments -> their settings (data.options.<name>), for its errors."""
    from fedsb.data.task import option_names

    names = {p: f"data.options.{p}" for p in option_names(task_cls)}
    names["validation_fraction + init_fraction"] = (
        "data.options.validation_fraction + data.options.init_fraction"
    )
    return {**names, "task": "data.task"}


def _factory(task: Any) -> Any:
    """What ``task`` was built from: its registered entry (a class or a `NamedTask`), else its class."""
    from fedsb.data.tasks import TASKS

    return TASKS.get(getattr(task, "name", None), type(task))


def task_from_config(cfg: RunConfig) -> Any:
    """The run's task, `get_task(data.task, **data.options)`; its errors name data.options.<option>."""
    from fedsb.data.tasks import TASKS, get_task, register_builtin_tasks

    register_builtin_tasks()
    cls = TASKS.get(cfg.data.task)
    with naming_settings(_option_names(cls) if cls is not None else {"task": "data.task"}):
        return get_task(cfg.data.task, **cfg.data.options)


def partition_rows(cfg: RunConfig, task: Any) -> tuple[list[Any], dict[str, Any]]:
    """The raw training rows split into the clients' shards, and the partition's statistics; errors name
    the setting behind the argument (`size` -> `data.train_size`, `min_size` -> `partition.min_size`)."""
    from fedsb.data.partition import partition_dataset, partition_stats

    with naming_settings({**_option_names(_factory(task)), "size": "data.train_size"}):
        train = task.load("train", cfg.data.train_size, cfg.seed)
    column = cfg.partition.column or task.partition_column
    with naming_settings(_PARTITION_ARGS):
        parts = partition_dataset(
            train,
            scheme=cfg.partition.scheme,
            num_clients=cfg.partition.num_clients,
            seed=derive_seed(cfg.seed, "partition") % (2**32),
            column=column if cfg.partition.scheme in ("dirichlet", "natural") else None,
            alpha=cfg.partition.alpha,
            min_size=cfg.partition.min_size,
        )
    return parts, partition_stats(parts, column if column in train.column_names else None)


def client_shards(
    cfg: RunConfig, task: Any, tokenizer: Any, parts: list[Any], indices: Iterable[int]
) -> dict[str, Any]:
    """client id -> `ClientData` (example count, loader) of the shards `parts[i]`, i in `indices`."""
    from fedsb.fed.simulate import ClientData

    ids = client_ids(len(parts))
    make_loader = loader_factory(cfg, task, tokenizer, cfg.train.batch_size)
    clients: dict[str, ClientData] = {}
    for i in indices:
        with naming_settings({"max_length": "data.max_length"}):
            tokenized = tokenize_task(task, parts[i], tokenizer, cfg.data.max_length, cache=cfg.data.cache)
        clients[ids[i]] = ClientData(num_examples=len(tokenized), loader=make_loader(tokenized))
    return clients


def client_ids(n: int) -> list[str]:
    """The ids of `n` clients: client-00, client-01, ... (zero-padded to the widest index)."""
    width = max(2, len(str(n - 1)))
    return [f"client-{i:0{width}d}" for i in range(n)]


def prepare_client(
    cfg: RunConfig, task: Any, tokenizer: Any, partition_id: int, *, cache_dir: Any = None
) -> PreparedData:
    """One client's data only (a Flower node's): the run's partition, but only shard `partition_id`
    tokenized; no evaluation set, no init data (the server's). `partition_stats["client_ids"]` lists all.
    With `data.cache` the node's shard index (`fedsb.data.shard_cache`, under `cache_dir`, default the
    fedsb cache) finds a shard prepared before without loading or partitioning the rows."""
    from fedsb.data.shard_cache import load_shard, shard_key
    from fedsb.fed.simulate import ClientData

    key = shard_key(cfg, task, tokenizer, partition_id) if cfg.data.cache else None
    hit = load_shard(key, cache_dir) if key is not None else None
    tokenized, stats = (
        hit if hit is not None else _tokenize_shard(cfg, task, tokenizer, partition_id, key, cache_dir)
    )
    ids = client_ids(int(stats["num_clients"]))
    loader = loader_factory(cfg, task, tokenizer, cfg.train.batch_size)(tokenized)
    clients = {ids[partition_id]: ClientData(num_examples=len(tokenized), loader=loader)}
    stats = {**stats, "client_ids": ids}
    sizes = {cid: c.num_examples for cid, c in clients.items()}
    return PreparedData(task, clients, sizes, stats, test=[], init_data=[])


def _tokenize_shard(
    cfg: RunConfig, task: Any, tokenizer: Any, partition_id: int, index_key: str | None, cache_dir: Any
) -> tuple[Any, dict[str, Any]]:
    """(tokenized shard `partition_id`, partition statistics) from the task's rows; indexed under
    `index_key` in the node's shard index unless it is None."""
    parts, stats = partition_rows(cfg, task)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(
            field="partition-id",
            value=partition_id,
            what=f"is outside the run's {len(parts)} partitions",
            fix=f"start SuperNodes with --node-config 'partition-id=<0..{len(parts) - 1}>'",
        )
    rows, max_length = parts[partition_id], cfg.data.max_length
    with naming_settings({"max_length": "data.max_length"}):
        if index_key is None:
            return tokenize_task(
                task, rows, tokenizer, max_length, cache=cfg.data.cache, cache_dir=cache_dir
            ), stats
        from fedsb.data.shard_cache import store_shard

        tkey = tokenized_key(task, rows, tokenizer, max_length)  # what the shard index points to
        tokenized = tokenize_task(
            task, rows, tokenizer, max_length, cache=True, cache_dir=cache_dir, key=tkey
        )
    store_shard(index_key, tkey, len(tokenized), stats, cache_dir)
    return tokenized, stats


def prepare_data(cfg: RunConfig, task: Any, tokenizer: Any) -> PreparedData:
    """Load and partition the task's data, tokenize each client's shard, and pick the init data (errors
    name the settings: data.test_size, data.eval_split, data.max_length, ...)."""
    parts, stats = partition_rows(cfg, task)
    names = {**_option_names(_factory(task)), "size": "data.test_size", "split": "data.eval_split"}
    with naming_settings(names):
        test = task.load(cfg.data.eval_split, cfg.data.test_size, cfg.seed)
    clients = client_shards(cfg, task, tokenizer, parts, range(len(parts)))
    sizes = {cid: c.num_examples for cid, c in clients.items()}
    stats["client_ids"] = list(clients)
    # init data: the server's own proxy sample (federated) or the clients' pooled data (paper; not federated)
    if cfg.init.source == "federated":  # no init data leaves a client (fedsb.init.federated)
        return PreparedData(task, clients, sizes, stats, test, None, federated_init_info(cfg, sizes))
    if cfg.init.source == "server":
        try:
            init_rows = task.load("init", cfg.init.server_size, cfg.seed)
        except FedsbError as exc:
            raise ConfigError(
                field="init.server_size",
                value=cfg.init.server_size,
                what=f"cannot be served ({exc})",
                fix="lower init.server_size",
            ) from None
    else:
        import datasets

        init_rows = datasets.concatenate_datasets(parts).shuffle(
            seed=derive_seed(cfg.seed, "pooled-init") % (2**32)
        )
    init_data = tokenize_task(task, init_rows, tokenizer, cfg.data.max_length, cache=cfg.data.cache)
    n = cfg.init.num_samples or max(
        cfg.init.min_samples, math.ceil(cfg.init.sample_fraction * len(init_data))
    )
    info = {
        "source": cfg.init.source,
        "federated": cfg.init.source == "server",
        "pool_size": len(init_data),
        "num_samples": min(n, len(init_data)),
        "note": "gradient estimate on the server's proxy sample; no client data touched"
        if cfg.init.source == "server"
        else "NOT FEDERATED: the basis is computed from raw examples of the clients' pooled training data",
    }
    return PreparedData(task, clients, sizes, stats, test, init_data, info)


def federated_init_info(cfg: RunConfig, sizes: dict[str, int]) -> dict[str, Any]:
    """init_info of init.source=federated: each client's gradient stays on it, noised under DP."""
    from fedsb.fed.federated_init import init_samples

    private = " with per-example clipping and Gaussian noise" if cfg.privacy.enabled else ""
    return {
        "source": "federated",
        "federated": True,
        "pool_size": sum(sizes.values()),
        "num_samples": sum(init_samples(cfg, n) for n in sizes.values()),
        "note": f"federated gradient {cfg.init.exchange} from the clients' own examples{private}; "
        "no example leaves a client",
    }
