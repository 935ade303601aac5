"""The playground's page: Generate (the vision modes, with sound), Actions (the three action modes, the rollout and
a plot of the actions) and a streaming Reasoner chat.

It is a Gradio `Blocks` mounted on the server's FastAPI app (`mount`), so it has no engine of its own: every
generation is a job on the server's worker (the same queue, batching, cancel and retention as the HTTP routes) and
every conversation takes the engine through the chat route's pool (`cosmos3.ui.bridge`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastapi import FastAPI

from cosmos3.generation.dialects import ACTION_MODES, VISION_MODES
from cosmos3.generation.request import ACTION_TIERS, EMBODIMENTS, FPS_VALUES, RESOLUTIONS, VIEW_POINTS
from cosmos3.server.jobs import Job
from cosmos3.server.settings import Settings
from cosmos3.server.state import ServerState
from cosmos3.ui import bridge
from cosmos3.ui.plot import plot_actions

DEFAULT = "model default"
DEFAULT_DOMAIN = "droid_lerobot"
RANDOM_SEED = -1
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
CSS = ".cosmos3-status p { margin: 0; }"


# ---------------------------------------------------------------------------------------------- helpers
def _choice(value: Any) -> Any:
    return None if value in (None, "", DEFAULT) else value


def _int(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _size(value: Any) -> int | None:
    """Width / height: 0 (or blank) takes the size from the resolution tier."""
    return _int(value) or None


def _seed(value: Any) -> int | None:
    """-1 (or blank): a random seed, shown with the result."""
    seed = _int(value)
    return None if seed is None or seed < 0 else seed


def _float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def _extra(text: str | None) -> dict[str, Any]:
    """The "more fields" box: a JSON object of further request fields (they win over the form's)."""
    if not text or not text.strip():
        return {}
    try:
        extra = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise gr.Error(f"More fields is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise gr.Error('More fields must be a JSON object, like {"shift": 5}')
    return extra


def _status(job: Job, server: ServerState) -> str:
    if job.status == "queued":
        ahead = bridge.queue_position(server, job.id)
        return f"Job `{job.id}`: queued" + (f", {ahead} ahead" if ahead else "")
    return f"Job `{job.id}`: {job.status.replace('_', ' ')} {job.progress}%"


def _progress_of(server: ServerState, progress: gr.Progress):
    def report(job: Job) -> None:
        progress(job.progress / 100, desc=_status(job, server))

    return report


def _downloads(server: ServerState, job: Job, extra: tuple[Path, ...] = ()) -> list[str]:
    """The job's outputs, whatever else its folder holds beside them (sidecars, plots), and the resolved request."""
    folder = server.worker.job_dir(job.id)
    request_file = folder / "request.json"
    if folder.is_dir() and not request_file.exists():
        record = {"job": job.id, "model": server.settings.model_name, "request": job.request, "result": job.result}
        request_file.write_text(json.dumps(record, indent=2, default=str))
    files = [Path(p) for p in job.outputs] + list(extra)
    if folder.is_dir():
        files += sorted(p for p in folder.iterdir() if p.is_file())
    seen: list[str] = []
    for path in files:
        if path.is_file() and str(path) not in seen:
            seen.append(str(path))
    return seen


def _request_view(job: Job) -> dict[str, Any]:
    return {"job": job.id, **{k: v for k, v in job.request.items() if k != "checked"}}


def _finished(server: ServerState, job: Job) -> Job:
    if job.status == "failed":
        error = job.error or {}
        param = error.get("param")
        message = error.get("message", "generation failed")
        raise gr.Error(f"{param}: {message}" if param and param not in message else message)
    return job


def _defaults(server: ServerState, mode: str) -> dict[str, Any]:
    """What the model fills in for `mode` (frames, steps, guidance, fps), resolved on stand-in media; the form
    starts from these."""
    fields: dict[str, Any] = {"mode": mode, "prompt": "x"}
    if mode in ("image2video", "policy", "forward_dynamics"):
        fields["image"] = np.zeros((64, 64, 3), np.uint8)
    elif mode in ("video2video", "inverse_dynamics"):
        fields["video"] = np.zeros((5, 64, 64, 3), np.uint8)
    if mode in ACTION_MODES:
        fields["domain_name"] = DEFAULT_DOMAIN
        if mode == "forward_dynamics":
            fields["action"] = np.zeros((16, EMBODIMENTS[DEFAULT_DOMAIN][1]), np.float32)
    try:
        req = server.engine.request(**fields)
    except Exception:  # a checkpoint whose defaults need more than this: the user fills them in
        return {"num_frames": 17, "num_steps": 35, "guidance": 6.0, "fps": 24, "size": None}
    return {
        "num_frames": req.num_frames,
        "num_steps": req.num_steps,
        "guidance": req.guidance,
        "fps": req.fps,
        "size": f"{req.width}x{req.height}" if req.width else None,
    }


# ---------------------------------------------------------------------------------------------- tabs
def _generate_tab(server: ServerState) -> None:
    job_state = gr.State(None)
    defaults = {m: _defaults(server, m) for m in VISION_MODES}
    start = defaults["text2video"]
    with gr.Row():
        with gr.Column(scale=1):
            mode = gr.Radio(list(VISION_MODES), value="text2video", label="Mode", elem_id="gen-mode")
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            image = gr.Image(type="filepath", label="First frame", visible=False, elem_id="gen-image")
            video = gr.Video(label="Input video", sources=["upload"], visible=False, elem_id="gen-video")
            sound = gr.Checkbox(label="Generate sound (needs a checkpoint with a sound tokenizer)", value=False)
            with gr.Accordion("Size and sampling", open=True):
                gr.Markdown(
                    f"The fields start at the model's defaults for the mode (size from the tier: "
                    f"{start['size'] or 'per checkpoint'}); width and height 0 take the tier's size; seed -1 is random."
                )
                with gr.Row():
                    resolution = gr.Dropdown([DEFAULT, *RESOLUTIONS], value=DEFAULT, label="Resolution tier")
                    aspect = gr.Dropdown([DEFAULT, *RESOLUTIONS["480"]], value=DEFAULT, label="Aspect ratio")
                with gr.Row():
                    width = gr.Number(0, label="Width (px; 0: the tier's)", precision=0, minimum=0, elem_id="gen-width")
                    height = gr.Number(
                        0, label="Height (px; 0: the tier's)", precision=0, minimum=0, elem_id="gen-height"
                    )
                with gr.Row():
                    frames = gr.Number(start["num_frames"], label="Frames", precision=0, elem_id="gen-frames")
                    fps = gr.Dropdown([str(v) for v in FPS_VALUES], value=f"{start['fps']:g}", label="FPS")
                with gr.Row():
                    steps = gr.Number(start["num_steps"], label="Steps", precision=0, elem_id="gen-steps")
                    guidance = gr.Number(start["guidance"], label="Guidance (1: no CFG)", elem_id="gen-guidance")
                    seed = gr.Number(RANDOM_SEED, label="Seed (-1: random)", precision=0, elem_id="gen-seed")
                extra = gr.Textbox(
                    label='More fields (JSON object, e.g. {"shift": 5, "use_system_prompt": false})',
                    lines=1,
                    elem_id="gen-extra",
                )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                cancel = gr.Button("Cancel", elem_id="gen-cancel")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="gen-status", elem_classes="cosmos3-status")
            out_video = gr.Video(label="Result", interactive=False, elem_id="gen-result-video")
            out_image = gr.Image(label="Result", interactive=False, visible=False, elem_id="gen-result-image")
            out_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="gen-seed-used")
            out_request = gr.JSON(label="Resolved request", elem_id="gen-request")
            out_files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="gen-files")

    def on_mode(m: str):
        d = defaults[m]
        return (
            gr.update(visible=m == "image2video"),
            gr.update(visible=m == "video2video"),
            d["num_frames"],
            f"{d['fps']:g}",
            d["num_steps"],
            d["guidance"],
        )

    mode.change(on_mode, mode, [image, video, frames, fps, steps, guidance], queue=False)
    outputs = [job_state, status, out_video, out_image, out_seed, out_request, out_files]

    def generate(m, p, neg, img, vid, snd, res, asp, w, h, n, f, st, g, sd, ext, progress=gr.Progress()):  # noqa: B008
        fields = {
            "mode": m,
            "prompt": p or "",
            "negative_prompt": neg or None,
            "width": _size(w),
            "height": _size(h),
            "num_frames": _int(n),
            "fps": _float(f),
            "num_steps": _int(st),
            "guidance": _float(g),
            "seed": _seed(sd),
            "enable_sound": bool(snd),
        }
        if fields["width"] is None and fields["height"] is None:
            fields["resolution"], fields["aspect_ratio"] = _choice(res), _choice(asp)
        media = {"image": img if m == "image2video" else None, "video": vid if m == "video2video" else None}
        try:
            job = bridge.submit_generation(server, fields, media, {"prompt": p, "source": "ui"}, _extra(ext))
        except bridge.UIError as exc:
            raise gr.Error(str(exc)) from exc
        yield job.id, _status(job, server), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        progress(0, desc=_status(job, server))
        job = _finished(server, bridge.wait_for_job(server, job.id, _progress_of(server, progress)))
        if job.status != "completed":
            yield None, f"Job `{job.id}`: {job.status}", None, None, None, _request_view(job), None
            return
        result = job.outputs[0]
        is_image = not result.endswith(".mp4")
        took = (job.completed_at or time.time()) - job.created_at
        yield (
            None,
            f"Job `{job.id}`: completed in {took:.1f} s",
            gr.update(value=None if is_image else result, visible=not is_image),
            gr.update(value=result if is_image else None, visible=is_image),
            job.request.get("seed"),
            _request_view(job),
            _downloads(server, job),
        )

    inputs = [mode, prompt, negative, image, video, sound, resolution, aspect, width, height, frames, fps, steps]
    inputs += [guidance, seed, extra]
    run.click(generate, inputs, outputs, concurrency_limit=None)

    def stop(job_id: str | None):
        if not job_id:
            return "Nothing is running."
        state = server.worker.cancel(job_id)
        return f"Job `{job_id}`: {state or 'gone'}"

    cancel.click(stop, job_state, status, queue=False)


def _actions_tab(server: ServerState) -> None:
    job_state = gr.State(None)
    start = _defaults(server, "policy")
    domains = [(f"{name} ({width} channels)", name) for name, (_, width) in EMBODIMENTS.items() if width]
    with gr.Row():
        with gr.Column(scale=1):
            mode = gr.Radio(list(ACTION_MODES), value="policy", label="Mode", elem_id="act-mode")
            prompt = gr.Textbox(label="Task prompt", lines=2, elem_id="act-prompt")
            domain = gr.Dropdown(domains, value=DEFAULT_DOMAIN, label="Embodiment (domain)", elem_id="act-domain")
            view = gr.Dropdown(list(VIEW_POINTS), value="ego_view", label="View point")
            with gr.Row():
                image = gr.Image(type="filepath", label="Observation image", elem_id="act-image")
                video = gr.Video(label="Observation video", sources=["upload"], elem_id="act-video")
            actions = gr.File(
                label='Actions (JSON: [steps][channels] or {"action": ...})',
                file_types=[".json"],
                type="filepath",
                visible=False,
                elem_id="act-actions",
            )
            with gr.Accordion("Rollout and sampling", open=True):
                with gr.Row():
                    chunk = gr.Number(
                        label="Chunk size (actions per chunk)", value=16, precision=0, elem_id="act-chunk"
                    )
                    chunks = gr.Number(label="Chunks", value=1, precision=0, elem_id="act-chunks")
                with gr.Row():
                    tier = gr.Dropdown([DEFAULT, *ACTION_TIERS], value=DEFAULT, label="Canvas tier")
                    fps = gr.Number(start["fps"], label="FPS", elem_id="act-fps")
                with gr.Row():
                    steps = gr.Number(start["num_steps"], label="Steps", precision=0, elem_id="act-steps")
                    guidance = gr.Number(start["guidance"], label="Guidance (1: no CFG)", elem_id="act-guidance")
                    seed = gr.Number(RANDOM_SEED, label="Seed (-1: random)", precision=0, elem_id="act-seed")
                extra = gr.Textbox(label='More fields (JSON object, e.g. {"action_stats": ...})', elem_id="act-extra")
            with gr.Row():
                run = gr.Button("Run", variant="primary", elem_id="act-run")
                cancel = gr.Button("Cancel", elem_id="act-cancel")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="act-status", elem_classes="cosmos3-status")
            out_video = gr.Video(label="Rollout", interactive=False, elem_id="act-result-video")
            out_frame = gr.Image(label="Rollout (one frame)", interactive=False, visible=False, elem_id="act-frame")
            out_plot = gr.Image(label="Actions", type="filepath", interactive=False, elem_id="act-plot")
            out_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="act-seed-used")
            out_actions = gr.JSON(label="Actions", elem_id="act-json")
            out_request = gr.JSON(label="Resolved request", elem_id="act-request")
            out_files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="act-files")

    mode.change(lambda m: gr.update(visible=m == "forward_dynamics"), mode, actions, queue=False)
    outputs = [job_state, status, out_video, out_frame, out_plot, out_seed, out_actions, out_request, out_files]

    def rollout(m, p, dom, vp, img, vid, act, ck, n, tr, f, st, g, sd, ext, progress=gr.Progress()):  # noqa: B008
        fields = {
            "mode": m,
            "prompt": p or "",
            "domain_name": dom,
            "view_point": vp,
            "action_chunk_size": _int(ck),
            "chunks": _int(n),
            "resolution": _choice(tr),
            "fps": _float(f),
            "num_steps": _int(st),
            "guidance": _float(g),
            "seed": _seed(sd),
        }
        media = {"image": img, "video": vid, "action": act if m == "forward_dynamics" else None}
        try:
            job = bridge.submit_generation(server, fields, media, {"prompt": p, "source": "ui"}, _extra(ext))
        except bridge.UIError as exc:
            raise gr.Error(str(exc)) from exc
        yield (job.id, _status(job, server), *[gr.skip()] * 7)
        progress(0, desc=_status(job, server))
        job = _finished(server, bridge.wait_for_job(server, job.id, _progress_of(server, progress)))
        if job.status != "completed":
            yield None, f"Job `{job.id}`: {job.status}", None, None, None, None, None, _request_view(job), None
            return
        plot = _action_plot(server, job)
        result = job.outputs[0]
        one_frame = not result.endswith(".mp4")  # a chunk of fewer frames than the VAE's temporal factor
        took = (job.completed_at or time.time()) - job.created_at
        action = {"action": job.result.get("action"), **job.result.get("action_meta", {})}
        yield (
            None,
            f"Job `{job.id}`: completed in {took:.1f} s",
            gr.update(value=None if one_frame else result, visible=not one_frame),
            gr.update(value=result if one_frame else None, visible=one_frame),
            str(plot) if plot else None,
            job.request.get("seed"),
            action,
            _request_view(job),
            _downloads(server, job, (plot,) if plot else ()),
        )

    inputs = [mode, prompt, domain, view, image, video, actions, chunk, chunks, tier, fps, steps, guidance, seed, extra]
    run.click(rollout, inputs, outputs, concurrency_limit=None)
    cancel.click(
        lambda job_id: f"Job `{job_id}`: {server.worker.cancel(job_id) or 'gone'}" if job_id else "Nothing is running.",
        job_state,
        status,
        queue=False,
    )


def _action_plot(server: ServerState, job: Job) -> Path | None:
    """The action PNG the result folder holds (written by `GenerationResult.save`), or one drawn here."""
    for path in job.outputs:
        if path.lower().endswith(".png") and Path(path).is_file():
            return Path(path)
    folder = server.worker.job_dir(job.id)
    found = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if found:
        return found[0]
    action = job.result.get("action")
    if not action:
        return None
    request = job.request
    title = f"{request.get('mode')} on {request.get('domain_name')}: {len(action)} steps x {len(action[0])} channels"
    if request.get("chunks", 1) > 1:
        title += f", {request['chunks']} chunks of {request.get('action_chunk_size')}"
    image = plot_actions(action, request.get("action_chunk_size"), title=title)
    path = folder / "actions.png"
    image.save(path)
    return path


def _reasoner_tab(server: ServerState, app: FastAPI) -> None:
    conversations = app.state.conversations
    conversation = gr.State([])  # the OpenAI messages so far (media as data URIs)
    chatbot = gr.Chatbot(label="Reasoner", height=420, elem_id="chat-log")
    box = gr.MultimodalTextbox(
        show_label=False,
        placeholder="Ask about an image or a video (attach with the clip), then Enter",
        file_types=["image", "video"],
        file_count="multiple",
        sources=["upload"],
        elem_id="chat-input",
    )
    status = gr.Markdown(elem_id="chat-status", elem_classes="cosmos3-status")
    with gr.Accordion("Sampling", open=False, elem_id="chat-sampling"):
        with gr.Row():
            max_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max tokens", elem_id="chat-max-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Top p")
        with gr.Row():
            top_k = gr.Number(value=20, precision=0, label="Top k (0: off)")
            presence = gr.Slider(-2.0, 2.0, value=1.5, step=0.1, label="Presence penalty")
            seed = gr.Number(RANDOM_SEED, label="Seed (-1: random)", precision=0, elem_id="chat-seed")
            reasoning = gr.Checkbox(label="Explicit reasoning (<think> format)", value=False)
    clear = gr.Button("New conversation", elem_id="chat-clear")

    async def respond(message, history, messages, mt, temp, tp, tk, pp, sd, think):
        text = ((message or {}).get("text") or "").strip()
        files = list((message or {}).get("files") or [])
        if not text and not files:
            raise gr.Error("Type a question (and attach an image or a video if you like).")
        try:
            user = bridge.user_message(text, files)
        except OSError as exc:
            raise gr.Error(f"cannot read the upload: {exc}") from exc
        asked = [*messages, user]
        shown = list(history or [])
        shown += [{"role": "user", "content": {"path": f}} for f in files]
        if text:
            shown.append({"role": "user", "content": text})
        shown.append({"role": "assistant", "content": ""})
        yield shown, None, messages, "Waiting for the engine..."
        options = {
            "max_tokens": int(mt),
            "temperature": float(temp),
            "top_p": float(tp),
            "top_k": int(tk or 0),
            "presence_penalty": float(pp),
            "seed": bridge.random_seed() if _seed(sd) is None else _seed(sd),
            "reasoning": bool(think),
        }
        reply, pieces, started = "", 0, time.monotonic()
        try:
            async for piece in bridge.stream_reply(server, conversations, asked, options):
                reply += piece
                pieces += 1
                shown[-1] = {"role": "assistant", "content": reply}
                yield shown, gr.skip(), gr.skip(), f"Streaming... {pieces} pieces"
        except bridge.UIError as exc:
            raise gr.Error(str(exc)) from exc
        took = time.monotonic() - started
        done = f"Streamed {pieces} pieces ({len(reply)} characters) in {took:.1f} s, seed {options['seed']}"
        yield shown, gr.skip(), [*asked, {"role": "assistant", "content": reply}], done

    box.submit(
        respond,
        [box, chatbot, conversation, max_tokens, temperature, top_p, top_k, presence, seed, reasoning],
        [chatbot, box, conversation, status],
        concurrency_limit=None,
    )
    clear.click(lambda: ([], [], None, ""), None, [chatbot, conversation, box, status], queue=False)


# ---------------------------------------------------------------------------------------------- entry points
def build(app: FastAPI) -> gr.Blocks:
    """The playground for an app made by `cosmos3.server.app.create_app` (its engine, worker and settings)."""
    server: ServerState = app.state.server
    engine = server.engine
    with gr.Blocks(title=f"cosmos3 playground: {server.settings.model_name}", analytics_enabled=False) as blocks:
        surfaces = ", ".join(getattr(engine, "surfaces", []) or [])
        gr.Markdown(
            f"### Cosmos 3 playground: `{server.settings.model_name}` ({surfaces})\n"
            "Every run is a job on the server's queue, like the HTTP API's."
        )
        with gr.Tabs():
            if engine.generator is not None:
                with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                    _generate_tab(server)
                with gr.Tab("Actions", id="actions", elem_id="tab-actions"):
                    _actions_tab(server)
            if engine.reasoner is not None:
                with gr.Tab("Reasoner chat", id="reasoner", elem_id="tab-reasoner"):
                    _reasoner_tab(server, app)
    return blocks


def mount(app: FastAPI, path: str = "/ui") -> FastAPI:
    """Mount the playground on `app` (made by `create_app`) at `path`: `cosmos3 serve --ui` mounts it at /ui.
    Result files are served from the server's outputs folder; uploads are capped like the API's."""
    settings: Settings = app.state.settings
    return gr.mount_gradio_app(
        app,
        build(app),
        path=path,
        allowed_paths=[str(Path(settings.outputs_dir).resolve())],
        max_file_size=settings.limits.max_upload_bytes,
        theme=gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"]),
        css=CSS,
        footer_links=["api", "settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
    )


def serve(
    engine: Any, settings: Settings | None = None, host: str = "127.0.0.1", port: int = 7860, path: str = "/"
) -> None:
    """`cosmos3 ui`: the HTTP API with the playground at `path`, under the server's uvicorn guards; blocks."""
    from cosmos3.server.app import create_app
    from cosmos3.server.serve import build_server

    app = create_app(engine, settings)
    mount(app, path)
    build_server(app, host, port).run()
