"""``megatron-opsd sidecar``: a FastAPI server around one in-process vLLM engine.

Concurrency: generation and weight application both run in worker threads and share one lock, so a weight
update waits for the generation in progress and a generation waits for an update being applied; every
response therefore comes from exactly one weight version, which it reports. Receiving and validating weight
buckets does not take the lock, so transfers overlap with generation; only ``commit`` blocks generation, for
the time the engine takes to copy the staged tensors in (~0.1 s for a tiny model on CPU).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from fastapi import Request  # module level: FastAPI resolves the string annotations of the handlers here

from megatron_opsd.rollout.protocol import (BUCKET_INDEX_HEADER, SHM_PATH_HEADER, UPDATE_ID_HEADER, GenerateRequest,
                                            SleepRequest, WeightsBeginRequest, WeightsUpdateRef,
                                            WeightTransferFinishBody, WeightTransferInitBody,
                                            WeightTransferStartBody, WeightTransferUpdateBody)
from megatron_opsd.rollout.staging import WeightStager, WeightUpdateError

logger = logging.getLogger("megatron_opsd.sidecar")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class SidecarState:
    """Engine, weight version, staged update and counters, shared by the request handlers."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()  # engine calls: generation vs. weight application
        self.version = 0  # the weights loaded from --model
        self.stager = WeightStager(engine.tensor_specs, engine.dtype,
                                   optional=frozenset({"lm_head.weight"}) if engine.tied_embeddings else frozenset())
        self.requests: Counter = Counter()  # (path, status) -> count
        self.in_flight = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.last_tokens_per_s = 0.0
        self.updates = 0
        self.last_update_latency_s = 0.0
        self.last_update_apply_s = 0.0
        self.collective_round: Optional[tuple[str, int]] = None  # (round_id, version) accepted, not yet received


def validate_generate(req: GenerateRequest, engine) -> list[list[int]]:
    """Token ids for each prompt, or a ``RequestError`` naming the offending field."""
    if not req.prompts:
        raise RequestError("prompts: empty list; send at least one prompt")
    max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))  # vLLM's own limit (a 500 inside vLLM)
    if not 1 <= req.n <= max_n:
        raise RequestError(f"n: {req.n} is invalid; n must be in [1, {max_n}] (VLLM_MAX_N_SEQUENCES)")
    for field_name in ("temperature", "top_p"):
        if not math.isfinite(getattr(req, field_name)):
            raise RequestError(f"{field_name}: {getattr(req, field_name)} is not a finite number")
    if req.n > 1 and req.temperature == 0:
        raise RequestError(f"n: {req.n} samples with temperature 0 would be identical; use n=1 or temperature > 0")
    if req.max_tokens < 1:
        raise RequestError(f"max_tokens: {req.max_tokens} is invalid; must be >= 1")
    if req.temperature < 0:
        raise RequestError(f"temperature: {req.temperature} is invalid; must be >= 0 (0 = greedy)")
    if not 0.0 < req.top_p <= 1.0:
        raise RequestError(f"top_p: {req.top_p} is invalid; must be in (0, 1]")
    if req.top_k is not None and req.top_k < -1:
        raise RequestError(f"top_k: {req.top_k} is invalid; use None, 0 or -1 for no top-k, or a positive k")
    prompts = [engine.tokenize(p) if isinstance(p, str) else list(p) for p in req.prompts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(f"prompts[{i}]: empty prompt")
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompts[{i}]: token id {bad} out of range [0, {engine.vocab_size})")
        if len(ids) + req.max_tokens > engine.max_model_len:
            raise RequestError(f"max_tokens: prompt {i} has {len(ids)} tokens, + max_tokens {req.max_tokens} "
                               f"exceeds the model length {engine.max_model_len}; lower max_tokens")
    for tok in req.stop_token_ids or []:
        if not 0 <= tok < engine.vocab_size:
            raise RequestError(f"stop_token_ids: {tok} out of range [0, {engine.vocab_size})")
    return prompts


def _metrics_text(state: SidecarState) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP opsd_sidecar_{name} {help_text}", f"# TYPE opsd_sidecar_{name} {kind}"])
        lines.extend(f"opsd_sidecar_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests by path and status",
           [(f'{{path="{p}",status="{s}"}}', c) for (p, s), c in sorted(state.requests.items())] or [("", 0)])
    metric("in_flight_requests", "gauge", "requests being served now", [("", state.in_flight)])
    metric("prompt_tokens_total", "counter", "prompt tokens processed", [("", state.prompt_tokens)])
    metric("generated_tokens_total", "counter", "tokens generated", [("", state.generated_tokens)])
    metric("generate_seconds_total", "counter", "engine time spent generating", [("", state.generate_seconds)])
    metric("tokens_per_second", "gauge", "generated tokens/s of the last /generate", [("", state.last_tokens_per_s)])
    metric("weight_version", "gauge", "version of the weights being served", [("", state.version)])
    metric("weight_updates_total", "counter", "weight updates applied", [("", state.updates)])
    metric("weight_update_latency_seconds", "gauge", "last update, begin to applied", [("", state.last_update_latency_s)])
    metric("weight_update_apply_seconds", "gauge", "last update, engine reload time", [("", state.last_update_apply_s)])
    return "\n".join(lines) + "\n"


def create_app(engine):
    """The FastAPI app serving ``engine`` (a ``VllmEngine`` or anything with the same methods)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from safetensors.torch import load as load_safetensors


    state = SidecarState(engine)
    app = FastAPI(title="megatron-opsd rollout sidecar")
    app.state.sidecar = state

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        state.in_flight += 1
        try:
            response = await call_next(request)
        finally:
            state.in_flight -= 1
        state.requests[(request.url.path, response.status_code)] += 1
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(RequestError)
    @app.exception_handler(WeightUpdateError)
    async def on_request_error(request: Request, exc: RequestError):
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    def locked(fn, *args, **kwargs):
        with state.lock:
            return fn(*args, **kwargs)

    @app.get("/health")
    async def health():
        return {"status": "ok", "weight_version": state.version, "model": engine.cfg.model,
                "in_flight": state.in_flight - 1, "sleeping": engine.sleeping, "vocab_size": engine.vocab_size,
                "max_model_len": engine.max_model_len, "update_in_progress": state.stager.in_progress,
                "world_size": engine.world_size, "weight_transfer_backend": engine.transfer_backend,
                "partial_weights": engine.partial_weights}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        prompts = validate_generate(req, engine)
        if engine.sleeping:
            raise RequestError("the engine is asleep; POST /wake_up first", status=409)
        if engine.partial_weights:
            raise RequestError(f"a weight update failed mid-transfer and left partly new weights; push a complete "
                               f"update (current version {state.version}) or restart the sidecar", status=503)

        def run():
            with state.lock:
                version, start = state.version, time.perf_counter()
                out = engine.generate(prompts, n=req.n, temperature=req.temperature, top_p=req.top_p,
                                      top_k=req.top_k, max_tokens=req.max_tokens, stop=req.stop,
                                      stop_token_ids=req.stop_token_ids, seed=req.seed, ignore_eos=req.ignore_eos)
                return version, time.perf_counter() - start, out

        try:
            version, elapsed, out = await asyncio.to_thread(run)
        except ValueError as err:  # vLLM's own validation (VLLMValidationError is a ValueError)
            raise RequestError(f"rejected by vLLM: {err}") from None
        generated = sum(len(s.token_ids) for samples in out for s in samples)
        state.prompt_tokens += sum(len(p) for p in prompts) * req.n
        state.generated_tokens += generated
        state.generate_seconds += elapsed
        state.last_tokens_per_s = generated / max(elapsed, 1e-9)
        return {"weight_version": version, "elapsed_s": elapsed, "generated_tokens": generated,
                "results": [[{"token_ids": s.token_ids, "logprobs": s.logprobs, "finish_reason": s.finish_reason,
                              "text": s.text, "weight_version": version} for s in samples] for samples in out]}

    # -- weights over HTTP / shared memory ------------------------------------------------------------
    @app.get("/weights/spec")
    async def weights_spec():
        return {"weight_version": state.version, "dtype": str(engine.dtype).replace("torch.", ""),
                "tied_embeddings": engine.tied_embeddings,
                "tensors": {k: list(shape) for k, (shape, _) in engine.tensor_specs.items()}}

    @app.post("/weights/begin")
    async def weights_begin(req: WeightsBeginRequest):
        update_id = state.stager.begin(req.version, state.version, req.num_tensors)
        return {"update_id": update_id, "weight_version": state.version}

    @app.post("/weights/bucket")
    async def weights_bucket(request: Request):
        update_id = request.headers.get(UPDATE_ID_HEADER)
        if not update_id:
            raise RequestError(f"header {UPDATE_ID_HEADER}: missing; send the update_id from POST /weights/begin")
        try:
            index = int(request.headers.get(BUCKET_INDEX_HEADER, "-1"))
        except ValueError:
            raise RequestError(f"header {BUCKET_INDEX_HEADER}: must be an integer") from None
        if index < 0:
            raise RequestError(f"header {BUCKET_INDEX_HEADER}: missing or negative; number buckets 0, 1, ...")
        state.stager.require(update_id)
        shm_path = request.headers.get(SHM_PATH_HEADER)
        if shm_path:
            path = Path(shm_path)
            if not path.is_file():
                raise RequestError(f"header {SHM_PATH_HEADER}: {shm_path} is not a file on the sidecar's host")
            data = await asyncio.to_thread(path.read_bytes)  # the client deletes the file once all replicas have it
        else:
            data = await request.body()
        try:
            tensors = await asyncio.to_thread(load_safetensors, data)
        except Exception as err:  # noqa: BLE001 - any parse failure is the client's bad body
            state.stager.abort(update_id)
            raise RequestError(f"body: bucket {index} is not a valid safetensors buffer ({err}); update aborted")
        received = state.stager.add_bucket(update_id, index, tensors)
        return {"update_id": update_id, "bucket": index, "tensors_received": received}

    @app.post("/weights/commit")
    async def weights_commit(req: WeightsUpdateRef):
        update = state.stager.take_for_commit(req.update_id)
        named = [(k, v) for bucket in update.buckets.values() for k, v in bucket.items()]
        if engine.sleeping:
            raise RequestError("the engine is asleep; POST /wake_up before committing weights", status=409)

        def apply():
            start = time.perf_counter()
            engine.load_weights(named)
            state.version = update.version
            return time.perf_counter() - start

        apply_s = await asyncio.to_thread(locked, apply)
        state.updates += 1
        state.last_update_apply_s = apply_s
        state.last_update_latency_s = time.perf_counter() - update.started
        logger.info("weights v%d applied: %d tensors, %.1f MB, apply %.3fs, total %.3fs", update.version,
                    len(named), update.nbytes / 1e6, apply_s, state.last_update_latency_s)
        return {"weight_version": state.version, "num_tensors": len(named), "bytes": update.nbytes,
                "apply_s": apply_s, "latency_s": state.last_update_latency_s}

    @app.post("/weights/abort")
    async def weights_abort(req: WeightsUpdateRef):
        return {"aborted": state.stager.abort(req.update_id), "weight_version": state.version}

    from megatron_opsd.rollout.lora import add_adapter_routes  # LoRA hook: POST /adapter/update

    add_adapter_routes(app, state, engine, locked, RequestError)

    # -- weights over a collective group (any TP; vLLM's weight-transfer flow) ---------------------------
    @app.post("/init_weight_transfer_engine")
    async def init_weight_transfer_engine(req: WeightTransferInitBody):
        """Join the trainer's group (every worker, blocking until the trainer opens its side)."""
        await asyncio.to_thread(engine.init_weight_transfer, req.init_info)
        return {"ok": True, "world_size": engine.world_size}

    @app.post("/start_weight_update")
    async def start_weight_update(req: WeightTransferStartBody):
        """Accept or refuse an update from its announced tensors, before the trainer sends any of them."""
        info = req.update_info
        try:
            names, shapes, dtype_names = info["names"], info["shapes"], info["dtype_names"]
            round_id = str(info["round_id"])
        except (KeyError, TypeError) as err:
            raise RequestError(f"update_info: missing field {err}; expected round_id, names, shapes, dtype_names")
        if req.weight_version <= state.version:
            raise RequestError(f"weight_version: {req.weight_version} must be greater than the current weight "
                               f"version {state.version}")
        state.stager.check_announced(names, shapes, dtype_names)
        state.collective_round = (round_id, req.weight_version)
        return {"accepted": True, "weight_version": state.version}

    @app.post("/update_weights")
    async def update_weights(req: WeightTransferUpdateBody):
        """Receive the broadcast on every worker and apply it as one update; the version moves only on success."""
        pending = state.collective_round
        if pending is None or req.update_info.get("round_id") != pending[0]:
            raise RequestError("update_info.round_id: not the update accepted by POST /start_weight_update",
                               status=409)
        if engine.sleeping:
            raise RequestError("the engine is asleep; POST /wake_up before updating weights", status=409)
        state.collective_round = None
        start = time.perf_counter()

        def apply():
            engine.receive_weights(req.update_info)
            state.version = pending[1]

        try:
            await asyncio.to_thread(locked, apply)
        except Exception as err:  # noqa: BLE001 - every worker rolled back; report why
            logger.warning("collective weight update v%d failed, previous weights kept: %s", pending[1], err)
            effect = "left partly new weights: generation is refused until a complete update" \
                if engine.partial_weights else "changed no weights"
            raise RequestError(f"weight update v{pending[1]} failed and {effect} (version stays "
                               f"{state.version}): {err}", status=500) from None
        state.updates += 1
        state.last_update_latency_s = state.last_update_apply_s = time.perf_counter() - start
        logger.info("weights v%d received and applied in %.3fs", state.version, state.last_update_latency_s)
        return {"weight_version": state.version, "apply_s": state.last_update_apply_s}

    @app.post("/finish_weight_update")
    async def finish_weight_update(req: WeightTransferFinishBody):
        """The trainer's confirmation: succeeds only if the sidecar now serves ``weight_version``."""
        if req.weight_version != state.version:
            raise RequestError(f"weight_version: {req.weight_version} is not being served (current: "
                               f"{state.version}); the update did not complete", status=409)
        return {"weight_version": state.version}

    # -- colocated use --------------------------------------------------------------------------------
    @app.post("/sleep")
    async def sleep(req: Optional[SleepRequest] = None):
        level = req.level if req else 1
        if level not in (0, 1, 2):
            raise RequestError(f"level: {level} is invalid; vLLM sleep levels are 0, 1, 2")
        try:
            note = await asyncio.to_thread(locked, engine.sleep, level)
        except Exception as err:  # noqa: BLE001 - e.g. engine started without sleep mode
            raise RequestError(f"sleep failed: {err} (start the sidecar with --enable-sleep-mode)", status=409)
        return {"sleeping": True, "note": note}

    @app.post("/wake_up")
    async def wake_up():
        note = await asyncio.to_thread(locked, engine.wake_up)
        return {"sleeping": False, "note": note}

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory to serve (weight version 0)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="KV cache size; default 256 MiB on CPU, profiled on GPU")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="disable CUDA graphs (always on for CPU)")
    parser.add_argument("--enable-sleep-mode", action="store_true", help="allow /sleep on GPU (colocated use)")
    parser.add_argument("--logprobs-mode", default="raw_logprobs",
                        help="raw_logprobs (model log-probs, default) or processed_logprobs (after temperature etc.)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="serve LoRA adapters up to this rank (POST /adapter/update; vLLM enable_lora)")
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.rollout.engine import EngineConfig, VllmEngine, prepare_vllm_env

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prepare_vllm_env()
    import uvicorn

    cfg = EngineConfig(model=args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                       max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager,
                       enable_sleep_mode=args.enable_sleep_mode, logprobs_mode=args.logprobs_mode, seed=args.seed,
                       max_lora_rank=args.max_lora_rank)
    try:
        cfg.validate()
    except ValueError as err:
        print(f"megatron-opsd sidecar: {err}", flush=True)
        return 2
    engine = VllmEngine(cfg)
    logger.info("serving %s on http://%s:%d (pid %d)", args.model, args.host, args.port, os.getpid())
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
