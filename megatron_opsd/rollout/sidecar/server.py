"""``megatron-opsd sidecar``: vLLM's own OpenAI-compatible server, with the RL routes vLLM lacks mounted on it.

vLLM builds the engine (``AsyncLLM``: continuous batching across concurrent requests, engine core and TP
workers in their own processes) and the app (``/v1/completions``, ``/v1/chat/completions``, ``/metrics``, ...);
this module adds ``/generate`` (token-id prompts, per-token log-probs, the weight version on every sample,
validation naming the field, a seed per prompt), the version-checked weight routes (HTTP/shm and collective)
and ``/adapter/update``, and replaces ``/health`` with one that reports the weight version. Weights reach every
TP worker through ``collective_rpc`` (``worker/extension.py``). Which of vLLM's own RL, generate and LoRA routes
could do the job of ours, and why ours stay: docs/sidecar.md, "Our routes and vLLM's own".

Weight versions: ``/generate`` requests share a gate that a weight change takes alone (``SidecarState.exclusive``):
the change waits for the generations in flight, which finish on the old weights, and holds new ones back; vLLM's
own routes are paused around it too. Every ``/generate`` answer therefore comes from exactly one version.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from safetensors.torch import load as load_safetensors

from megatron_opsd.rollout.environment import on_gpu, prepare_vllm_env
from megatron_opsd.rollout.protocol import (BUCKET_INDEX_HEADER, SHM_PATH_HEADER, UPDATE_ID_HEADER, GenerateRequest,
                                            WeightsBeginRequest, WeightsUpdateRef,
                                            WeightTransferFinishBody, WeightTransferInitBody,
                                            WeightTransferStartBody, WeightTransferUpdateBody)
from megatron_opsd.rollout.secret import rendezvous_key
from megatron_opsd.rollout.sidecar.auth import RequireSecret, sidecar_secret
from megatron_opsd.rollout.sidecar.engine import EngineConfig, checkpoint_tensor_specs
from megatron_opsd.rollout.sidecar.leftovers import clean_dead_leftovers
from megatron_opsd.rollout.sidecar.lora import add_adapter_route
from megatron_opsd.rollout.sidecar.staging import WeightStager, WeightUpdateError, check_version

logger = logging.getLogger("megatron_opsd.sidecar")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class SidecarRoute(APIRoute):
    """Our routes answer our errors as ``{"detail": ...}`` with their status (vLLM's app answers a ValueError in
    OpenAI's error format, as a 400)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer_errors(request: Request):
            try:
                return await handler(request)
            except (RequestError, WeightUpdateError) as err:
                return JSONResponse(status_code=err.status, content={"detail": str(err)})

        return answer_errors


class GenerationGate:
    """Many generations at once, or one weight change alone; a waiting change holds new generations back."""

    def __init__(self):
        self.generating = 0
        self.changing = False
        self.cond = asyncio.Condition()

    @asynccontextmanager
    async def shared(self):
        async with self.cond:
            await self.cond.wait_for(lambda: not self.changing)
            self.generating += 1
        try:
            yield
        finally:
            async with self.cond:
                self.generating -= 1
                self.cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        async with self.cond:
            await self.cond.wait_for(lambda: not self.changing)
            self.changing = True
            await self.cond.wait_for(lambda: self.generating == 0)
        try:
            yield
        finally:
            async with self.cond:
                self.changing = False
                self.cond.notify_all()


class SidecarState:
    """The engine client, what we know about the served checkpoint, the weight version and counters."""

    def __init__(self, engine, model_dir: str, transfer_backend: str, max_lora_rank: Optional[int], secret: str):
        config = engine.model_config
        self.engine, self.model_dir, self.transfer_backend = engine, model_dir, transfer_backend
        self.secret = secret  # guards every route but /health (auth.RequireSecret) and the transfer rendezvous
        self.max_lora_rank = max_lora_rank
        self.max_model_len: int = int(config.max_model_len)
        self.vocab_size: int = int(config.get_vocab_size())
        self.tied_embeddings: bool = bool(getattr(config.hf_config, "tie_word_embeddings", False))
        self.dtype = config.dtype
        self.world_size: int = int(engine.vllm_config.parallel_config.world_size)
        self.tensor_specs = checkpoint_tensor_specs(model_dir)
        if self.tied_embeddings:  # trainers may or may not send the (identical) LM head
            self.tensor_specs.pop("lm_head.weight", None)
        self.stager = WeightStager(self.tensor_specs, self.dtype,
                                   optional=frozenset({"lm_head.weight"}) if self.tied_embeddings else frozenset())
        self.gate = GenerationGate()
        self.version = 0  # the weights loaded from --model
        self.lora_request = None  # the adapter served with the base weights (sidecar/lora.py)
        self.adapter_root: Optional[Path] = None  # where pushed adapters are written for vLLM to load
        self.partial_weights = False  # a collective update failed after loading some tensors
        self.partial_reason = ""  # why (answered with every 503 until a complete update arrives)
        self.collective_round: Optional[tuple[str, int]] = None  # (round_id, version) accepted, not yet received
        self.prompt_tokens = self.generated_tokens = self.updates = 0
        self.generate_seconds = self.last_tokens_per_s = 0.0
        self.last_update_latency_s = self.last_update_apply_s = 0.0

    @asynccontextmanager
    async def exclusive(self):
        """Change weights with nothing generating: ``/generate`` through the gate, vLLM's routes paused (in-flight
        requests finish first); the prefix cache is cleared, since it was computed with the old weights."""
        async with self.gate.exclusive():
            await self.engine.pause_generation(mode="wait", clear_cache=True)
            try:
                yield
            finally:
                await self.engine.reset_prefix_cache()
                await self.engine.resume_generation()

    def record_update(self, apply_s: float, latency_s: float) -> None:
        self.updates += 1
        self.last_update_apply_s, self.last_update_latency_s = apply_s, latency_s

    def collect(self):
        """Our metrics on vLLM's ``/metrics`` (a prometheus collector on vLLM's registry)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, family, help_text, value in [
                ("in_flight_requests", GaugeMetricFamily, "/generate requests being served", self.gate.generating),
                ("prompt_tokens", CounterMetricFamily, "prompt tokens processed by /generate", self.prompt_tokens),
                ("generated_tokens", CounterMetricFamily, "tokens generated by /generate", self.generated_tokens),
                ("generate_seconds", CounterMetricFamily, "time spent in /generate", self.generate_seconds),
                ("tokens_per_second", GaugeMetricFamily, "generated tokens/s of the last /generate",
                 self.last_tokens_per_s),
                ("weight_version", GaugeMetricFamily, "version of the weights being served", self.version),
                ("weight_updates", CounterMetricFamily, "weight updates applied", self.updates),
                ("weight_update_latency_seconds", GaugeMetricFamily, "last update, begin to applied",
                 self.last_update_latency_s),
                ("weight_update_apply_seconds", GaugeMetricFamily, "last update, engine reload time",
                 self.last_update_apply_s)]:
            yield family(f"opsd_sidecar_{name}", help_text, value=value)


def validate_generate(req: GenerateRequest, state: SidecarState) -> list[list[int]]:
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
    tokenizer = state.engine.get_tokenizer()
    prompts = [list(tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else list(p)
               for p in req.prompts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(f"prompts[{i}]: empty prompt")
        bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompts[{i}]: token id {bad} out of range [0, {state.vocab_size})")
        if len(ids) + req.max_tokens > state.max_model_len:
            raise RequestError(f"max_tokens: prompt {i} has {len(ids)} tokens, + max_tokens {req.max_tokens} "
                               f"exceeds the model length {state.max_model_len}; lower max_tokens")
    for tok in req.stop_token_ids or []:
        if not 0 <= tok < state.vocab_size:
            raise RequestError(f"stop_token_ids: {tok} out of range [0, {state.vocab_size})")
    return prompts


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as ``model``, or a 422 naming each bad field (our format, not vLLM's OpenAI error)."""
    try:
        return model.model_validate(await request.json() if await request.body() else {})
    except ValidationError as err:
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()]
        raise RequestError("; ".join(parts)) from None
    except ValueError as err:  # not JSON
        raise RequestError(f"body: not valid JSON ({err})") from None


async def sample(state: SidecarState, prompts: list[list[int]], req: GenerateRequest) -> list[list[dict]]:
    """All prompts submitted at once (continuous batching); prompt ``i`` samples with seed ``seed + i``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int, prompt: list[int]):
        params = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0,
                                max_tokens=req.max_tokens, stop=req.stop or None,
                                stop_token_ids=req.stop_token_ids or None, ignore_eos=req.ignore_eos, logprobs=0,
                                seed=None if req.seed is None else req.seed + i,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for final in state.engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                                 f"opsd-{uuid.uuid4().hex}", lora_request=state.lora_request):
            pass
        return [{"token_ids": list(o.token_ids), "finish_reason": str(o.finish_reason), "text": o.text,
                 "logprobs": [float(step[t].logprob) for t, step in zip(o.token_ids, o.logprobs or [])]}
                for o in sorted(final.outputs, key=lambda o: o.index)]

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


# (method, path, handler): our routes in the order they are mounted; LoRA's POST /adapter/update is in sidecar/lora.py
ROUTES = (
    ("GET", "/health", "health"),
    ("POST", "/generate", "generate"),
    ("GET", "/weights/spec", "weights_spec"),
    ("POST", "/weights/begin", "weights_begin"),
    ("POST", "/weights/bucket", "weights_bucket"),
    ("POST", "/weights/commit", "weights_commit"),
    ("POST", "/weights/abort", "weights_abort"),
    ("POST", "/init_weight_transfer_engine", "init_weight_transfer_engine"),
    ("POST", "/start_weight_update", "start_weight_update"),
    ("POST", "/update_weights", "update_weights"),
    ("POST", "/finish_weight_update", "finish_weight_update"),
)


class SidecarRoutes:
    """Our HTTP routes as methods over one ``SidecarState``, one short handler per route (``build_router`` mounts
    them as listed in ``ROUTES``)."""

    def __init__(self, state: SidecarState):
        self.state, self.engine = state, state.engine

    async def health(self):
        state, engine = self.state, self.engine
        await engine.check_health()  # raises (-> 500) once the engine core died
        return {"status": "ok", "weight_version": state.version, "model": state.model_dir,
                "in_flight": state.gate.generating, "vocab_size": state.vocab_size,
                "max_model_len": state.max_model_len, "update_in_progress": state.stager.in_progress,
                "world_size": state.world_size, "weight_transfer_backend": state.transfer_backend,
                "partial_weights": state.partial_weights, "partial_reason": state.partial_reason}

    async def generate(self, request: Request):
        state = self.state
        req = await parse_body(request, GenerateRequest)
        prompts = validate_generate(req, state)
        async with state.gate.shared():
            if state.partial_weights:
                raise RequestError(f"a weight update failed mid-transfer and left partly new weights "
                                   f"({state.partial_reason}); waiting for a complete push (current version "
                                   f"{state.version})", status=503)
            version, start = state.version, time.perf_counter()
            try:
                results = await sample(state, prompts, req)
            except ValueError as err:  # vLLM's own validation (VLLMValidationError is a ValueError)
                raise RequestError(f"rejected by vLLM: {err}") from None
        elapsed = time.perf_counter() - start
        generated = sum(len(s["token_ids"]) for samples in results for s in samples)
        state.prompt_tokens += sum(len(p) for p in prompts) * req.n
        state.generated_tokens += generated
        state.generate_seconds += elapsed
        state.last_tokens_per_s = generated / max(elapsed, 1e-9)
        for samples in results:
            for s in samples:
                s["weight_version"] = version
        return {"weight_version": version, "elapsed_s": elapsed, "generated_tokens": generated, "results": results}

    # -- weights over HTTP / shared memory: staged to files, every worker reads them -------------------------
    async def weights_spec(self):
        state = self.state
        return {"weight_version": state.version, "dtype": str(state.dtype).replace("torch.", ""),
                "tied_embeddings": state.tied_embeddings,
                "tensors": {k: list(shape) for k, (shape, _) in state.tensor_specs.items()}}

    async def weights_begin(self, request: Request):
        state = self.state
        req = await parse_body(request, WeightsBeginRequest)
        update_id = state.stager.begin(req.version, state.version, req.num_tensors, req.restore)
        if req.restore:
            logger.info("restore v%d announced over HTTP (serving v%d)", req.version, state.version)
        return {"update_id": update_id, "weight_version": state.version}

    async def weights_bucket(self, request: Request):
        state = self.state
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
        received = await asyncio.to_thread(state.stager.add_bucket, update_id, index, tensors)
        return {"update_id": update_id, "bucket": index, "tensors_received": received}

    async def weights_commit(self, request: Request):
        state, engine = self.state, self.engine
        req = await parse_body(request, WeightsUpdateRef)
        update = state.stager.take_for_commit(req.update_id)
        try:
            async with state.exclusive():
                start = time.perf_counter()
                errors = sorted({e for e in await engine.collective_rpc("opsd_load_weights", args=(update.files,))
                                 if e})
                if errors:
                    raise RuntimeError(f"loading the staged weights failed: {'; '.join(errors)}")
                state.version = update.version
                state.partial_weights, state.partial_reason = False, ""  # every tensor was replaced
                apply_s = time.perf_counter() - start
        finally:
            update.discard()
        state.record_update(apply_s, time.perf_counter() - update.started)
        logger.info("weights v%d applied: %d tensors, %.1f MB, apply %.3fs, total %.3fs", update.version,
                    len(update.owner), update.nbytes / 1e6, apply_s, state.last_update_latency_s)
        return {"weight_version": state.version, "num_tensors": len(update.owner), "bytes": update.nbytes,
                "apply_s": apply_s, "latency_s": state.last_update_latency_s}

    async def weights_abort(self, request: Request):
        state = self.state
        req = await parse_body(request, WeightsUpdateRef)
        return {"aborted": state.stager.abort(req.update_id), "weight_version": state.version}

    # -- weights over a collective group (any TP; vLLM's weight-transfer flow) ---------------------------
    async def init_weight_transfer_engine(self, request: Request):
        """Join the trainer's group (every worker, blocking until the trainer opens its side): vLLM's engine call,
        with the group's key added (docs/sidecar.md, "Our routes and vLLM's own")."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        state, engine = self.state, self.engine
        req = await parse_body(request, WeightTransferInitBody)
        try:  # the group's one-time key, from our secret: the workers join only the trainer's group
            key = rendezvous_key(state.secret, str(req.init_info.get("nonce") or ""))
        except ValueError as err:
            raise RequestError(str(err)) from None
        init_info = dict(req.init_info, store_key=key)
        await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))
        return {"ok": True, "world_size": state.world_size}

    async def start_weight_update(self, request: Request):
        """Accept or refuse an update from its announced tensors, before the trainer sends any of them."""
        state = self.state
        req = await parse_body(request, WeightTransferStartBody)
        info = req.update_info
        try:
            names, shapes, dtype_names = info["names"], info["shapes"], info["dtype_names"]
            round_id = str(info["round_id"])
        except (KeyError, TypeError) as err:
            raise RequestError(f"update_info: missing field {err}; expected round_id, names, shapes, dtype_names")
        check_version(req.weight_version, state.version, req.restore, field="weight_version")
        state.stager.check_announced(names, shapes, dtype_names)
        if req.restore:
            logger.info("restore v%d accepted (serving v%d)", req.weight_version, state.version)
        state.collective_round = (round_id, req.weight_version)
        return {"accepted": True, "weight_version": state.version}

    async def update_weights(self, request: Request):
        """Receive the broadcast on every worker and apply it as one update, through vLLM's engine calls (each a
        ``collective_rpc`` of the same name); the version moves only on success."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        state, engine = self.state, self.engine
        req = await parse_body(request, WeightTransferUpdateBody)
        pending = state.collective_round
        if pending is None or req.update_info.get("round_id") != pending[0]:
            raise RequestError("update_info.round_id: not the update accepted by POST /start_weight_update",
                               status=409)
        state.collective_round = None
        start = time.perf_counter()
        try:
            async with state.exclusive():
                try:
                    await engine.start_weight_update()
                    await engine.update_weights(WeightTransferUpdateRequest(update_info=req.update_info))
                    errors = sorted({e for e in await engine.collective_rpc("opsd_update_error") if e})
                    if errors:  # the workers report failures instead of raising (worker/collective.update_weights)
                        raise RuntimeError("; ".join(errors))
                    await engine.finish_weight_update()  # no version: ours is state.version, set below
                except BaseException as err:
                    partly = await engine.collective_rpc("opsd_abort_weight_update")  # every worker drops its group
                    if any(partly):
                        state.partial_weights = True
                        state.partial_reason = f"update v{pending[1]}: {err}"[:500]
                    raise
                state.partial_weights, state.partial_reason = False, ""
                state.version = pending[1]
        except Exception as err:  # noqa: BLE001 - every worker ended its session; report why
            logger.warning("collective weight update v%d failed: %s", pending[1], err)
            effect = "left partly new weights: generation is refused (503) until a complete update" \
                if state.partial_weights else "changed no weights"
            raise RequestError(f"weight update v{pending[1]} failed and {effect} (version stays "
                               f"{state.version}): {err}", status=500) from None
        elapsed = time.perf_counter() - start
        state.record_update(elapsed, elapsed)
        logger.info("weights v%d received and applied in %.3fs", state.version, elapsed)
        return {"weight_version": state.version, "apply_s": elapsed}

    async def finish_weight_update(self, request: Request):
        """The trainer's confirmation: succeeds only if the sidecar now serves ``weight_version``."""
        state = self.state
        req = await parse_body(request, WeightTransferFinishBody)
        if req.weight_version != state.version:
            raise RequestError(f"weight_version: {req.weight_version} is not being served (current: "
                               f"{state.version}); the update did not complete", status=409)
        return {"weight_version": state.version}


def build_router(state: SidecarState) -> APIRouter:
    """``ROUTES`` on one router, then LoRA's ``POST /adapter/update`` (``sidecar/lora.py``)."""
    routes, router = SidecarRoutes(state), APIRouter(route_class=SidecarRoute)
    for method, path, name in ROUTES:
        router.add_api_route(path, getattr(routes, name), methods=[method])
    add_adapter_route(router, state, RequestError)
    return router


def mount(app, state: SidecarState) -> None:
    """Our routes first (they replace vLLM's ``/health``), our metrics on vLLM's registry, and the secret around the
    whole app: outermost in the middleware stack, so it answers before vLLM's middleware and any route."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    router = build_router(state)
    ours = {(route.path, frozenset(route.methods)) for route in router.routes}
    vllm_routes = [r for r in app.router.routes
                   if (getattr(r, "path", None), frozenset(getattr(r, "methods", None) or ())) not in ours]
    app.router.routes[:] = []
    app.include_router(router)
    app.router.routes.extend(vllm_routes)

    get_prometheus_registry().register(state)
    app.state.sidecar = state
    if app.middleware_stack is None:
        app.add_middleware(RequireSecret, secret=state.secret)
    else:  # vLLM's SageMaker bootstrap (``build_app``) built the stack already ("app.middleware_stack =
        # app.build_middleware_stack()"), so add_middleware refuses; a rebuild would make a second instance of each
        # middleware (vLLM's request metrics then stay at zero): wrap the built stack instead
        app.middleware_stack = RequireSecret(app.middleware_stack, state.secret)


async def serve(cfg, host: str, port: int, log_level: str, secret: str) -> None:
    """vLLM's ``run_server_worker`` with our routes mounted between building the app and serving it."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from megatron_opsd.rollout.transfer import transfer_backend  # imports vLLM

    backend = transfer_backend(on_gpu())
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        cfg.vllm_args(backend) + ["--host", host, "--port", str(port), "--uvicorn-log-level", log_level])
    validate_parsed_serve_args(args)
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        state = SidecarState(engine, cfg.model, backend, cfg.max_lora_rank, secret)
        mount(app, state)
        logger.info("serving %s on http://%s (pid %d)", cfg.model, listen_address, os.getpid())
        # on SIGTERM vLLM stops the engine first: requests still open then can never finish, so cancel them soon
        shutdown = await serve_http(app, sock=sock, host=host, port=port, log_level=log_level,
                                    timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, timeout_graceful_shutdown=3)
    try:
        await shutdown
    finally:
        sock.close()
        state.stager.abort()  # an update staged but never committed: free its files (host memory)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory to serve (weight version 0)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: loopback by default; a cluster node's own address (or name) to "
                             "serve trainers on other nodes")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="KV cache size; default 256 MiB on CPU, profiled on GPU")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="disable CUDA graphs (always on for CPU)")
    parser.add_argument("--logprobs-mode", default="raw_logprobs",
                        help="raw_logprobs (model log-probs, default) or processed_logprobs (after temperature etc.)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="serve LoRA adapters up to this rank (POST /adapter/update; vLLM enable_lora)")
    parser.add_argument("--secret-file", default=None,
                        help="file holding the secret every call must carry (Authorization: Bearer; only GET /health "
                             "is open), created readable only by you if it does not exist; default "
                             "$OPSD_SIDECAR_SECRET, else $OPSD_SIDECAR_SECRET_FILE, else a new file whose path is "
                             "logged. Never pass the secret itself as an argument")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--vllm-args", default="",
                        help="further flags for vLLM's server, one string, e.g. --vllm-args='--max-num-seqs 128'")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prepare_vllm_env()
    cfg = EngineConfig(model=args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                       max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager,
                       logprobs_mode=args.logprobs_mode, seed=args.seed,
                       max_lora_rank=args.max_lora_rank, extra=shlex.split(args.vllm_args))
    try:
        cfg.validate()
    except ValueError as err:
        print(f"megatron-opsd sidecar: {err}", flush=True)
        return 2
    clean_dead_leftovers()  # what killed runs left in /dev/shm (sidecar/leftovers.py), before this one adds its own
    import uvloop

    secret, created = sidecar_secret(args.secret_file, args.port)
    try:
        uvloop.run(serve(cfg, args.host, args.port, args.log_level.lower(), secret))
    finally:
        if created is not None:
            created.unlink(missing_ok=True)
    return 0
