"""The Hugging Face Hub: push a distilled student with a model card; pull one back through the cache.

Everything goes through huggingface_hub's own client (``HfApi``, ``ModelCard``, ``hf_hub_download``,
``try_to_load_from_cache``). The endpoint is ``HF_ENDPOINT`` read at call time (so a process can
point it at another server after importing huggingface_hub), else the client's default.

- **Push** (``kdcli push RUN --repo org/name``): exports the student into a temporary folder
  (:func:`kdcli.export.stage`), adds ``README.md`` (the card), ``results.csv``, the run's plots
  (``*.png``) and the resolved run config (``run_config.json``), creates the repo if needed and
  commits everything in one ``create_commit`` (optionally on a branch, optionally as a pull request).
- **Pull**: only ``kdcli pull hf-hub:org/name[@rev]`` downloads, and ``kdcli zoo fetch hf-hub:org/name[@rev]``,
  which calls the same :func:`fetch` when the repo's ``config.json`` holds a kdcli model spec. Everywhere
  else (``--student``/``--teacher hf-hub:...``, ``kdcli eval hf-hub:...``) reads the cache only, at the
  named revision (``main`` without one), and a miss is a one-line error naming the pull command.
- **Token**: ``huggingface_hub.get_token()`` (``HF_TOKEN``, then the login cache). It is passed to
  the client and nowhere else: never printed, never written to a run folder or a card, and the
  staged files are scanned for it before upload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KdcliError, ZooError
from .io import _scrub, is_kdcli_config
from .zoo import register_scheme

if TYPE_CHECKING:
    from .zoo import ModelRef

PREFIX = "hf-hub:"
MODEL_FILES = ("config.json", "model.safetensors")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TASK_TAG = {"detection": "object-detection", "segmentation": "image-segmentation"}
MAIN_METRIC = {"detection": "mAP", "segmentation": "mIoU"}
CARD_METRICS = {"detection": ("mAP", "AP50", "AP75", "APs", "APm", "APl"), "segmentation": ("mIoU", "pixel_acc")}


class HubError(KdcliError):
    """The Hub refused or could not be reached: missing token, 401/403/404, offline mode."""


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@rev]`` → (``org/name``, ``rev`` or None)."""
    body = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    repo, _, rev = body.partition("@")
    if not _REPO.match(repo):
        raise ZooError(f"{ref}: expected hf-hub:org/name[@revision]")
    return repo, rev or None


def check_repo_id(repo: str) -> str:
    if not _REPO.match(repo or ""):
        raise HubError(f"--repo {repo}: expected org/name")
    return repo


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _require_online(what: str) -> None:
    """kdcli's offline switches (``--offline``/``KDCLI_OFFLINE``, ``HF_HUB_OFFLINE`` now or at import)."""
    from .weights import hub_offline

    if hub_offline():
        raise HubError(f"{what}: offline mode (KDCLI_OFFLINE / HF_HUB_OFFLINE) is set; unset it to reach the Hub")


def token_or_fail() -> str:
    """The user's token from the usual places, or a one-line error. Never printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's connection/timeout errors (huggingface_hub 2.x: httpx2; older: httpx, requests)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@contextmanager
def hub_errors(what: str, repo: str, token: str | None = None, write: bool = False) -> Iterator[None]:
    """Map huggingface_hub's exceptions to one-line :class:`HubError` messages (no traceback, no token)."""
    from huggingface_hub import errors as e

    transport = _transport_errors()
    try:
        yield
    except KdcliError:
        raise
    except e.OfflineModeIsEnabled:
        raise HubError(f"{what}: offline mode (KDCLI_OFFLINE / HF_HUB_OFFLINE) is set; unset it to reach the Hub") \
            from None
    except e.GatedRepoError:
        raise HubError(f"{what}: {repo} is gated; request access on the Hub first (403)") from None
    except e.RevisionNotFoundError:
        raise HubError(f"{what}: {repo} has no such revision (404)") from None
    except e.RemoteEntryNotFoundError as err:
        name = str(getattr(err.response, "url", "")).rsplit("/", 1)[-1]
        raise HubError(f"{what}: {repo} has no file {name or '?'}; is it a kdcli model? (404)") from None
    except e.RepositoryNotFoundError as err:
        status = _status(err)
        if status == 401:
            raise HubError(f"{what}: the Hub rejected the token (401): check HF_TOKEN or `hf auth login`") from None
        raise HubError(f"{what}: repository {repo} not found, or private and not visible with your token "
                       f"({status or 404})") from None
    except e.HfHubHTTPError as err:
        status = _status(err)
        if status == 401:
            raise HubError(f"{what}: the Hub rejected the token (401): check HF_TOKEN or `hf auth login`") from None
        if status == 403:
            if write:
                raise HubError(f"{what}: forbidden (403): your token cannot write to {repo} "
                               "(needs a write token and access to the namespace)") from None
            raise HubError(f"{what}: forbidden (403): your token has no access to {repo}") from None
        if status == 404:
            raise HubError(f"{what}: {repo} not found (404)") from None
        raise HubError(f"{what}: the Hub answered {status or 'an error'}: {_scrub(_first_line(err), token)}") from None
    except transport as err:  # incl. LocalEntryNotFoundError: no answer and nothing cached
        answered = _http_cause(err)
        if answered is not None:  # the client wraps an HTTP answer (e.g. 501 from a Hub without Xet)
            status = _status(answered)
            raise HubError(f"{what}: {endpoint()} answered {status} to the file request "
                           f"({_scrub(_first_line(answered), token)}); it is reachable but does not serve this "
                           "download") from None
        raise HubError(f"{what}: cannot reach {endpoint()} ({type(err).__name__})") from None
    except ValueError as err:  # e.g. invalid card metadata reported by the validate-yaml endpoint
        raise HubError(f"{what}: {_scrub(_first_line(err), token)}") from None


def _http_cause(err: BaseException) -> BaseException | None:
    """The HTTP error with a status code that ``err`` was raised from, if any."""
    seen: set[int] = set()
    cause: BaseException | None = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _status(cause) is not None:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


# -- pull ----------------------------------------------------------------------------------------------
def resolve_hub_ref(ref: str) -> ModelRef:
    """A pushed kdcli model from the Hugging Face cache only (no network): spec + local weights."""
    from huggingface_hub import try_to_load_from_cache

    from .zoo import ModelRef, load_model_config

    repo, rev = parse_ref(ref)
    found: dict[str, Path] = {}
    for name in MODEL_FILES:
        hit = try_to_load_from_cache(repo, name, revision=rev)
        if not isinstance(hit, str):
            raise ZooError(f"{ref}: not in the Hugging Face cache; download it with `kdcli pull {ref}` "
                           f"(or `kdcli zoo fetch {ref}`)")
        found[name] = Path(hit)
    if not is_kdcli_config(found["config.json"], ref):
        raise ZooError(f"{ref}: config.json has no kdcli model spec; not a kdcli model")
    return ModelRef(load_model_config(found["config.json"]), found["model.safetensors"], ref)


def fetch(ref: str, command: str = "kdcli pull") -> Path:
    """Download a pushed kdcli model's ``config.json`` and ``model.safetensors`` at the ref's revision
    into the cache; returns the snapshot folder. ``command`` starts the error messages (``kdcli pull``,
    or ``kdcli zoo fetch``, which comes here for kdcli models)."""
    from huggingface_hub import HfApi, get_token, hf_hub_download

    repo, rev = parse_ref(ref)
    _require_online(f"{command} {ref}")
    token = get_token()  # optional: public repos need none
    path = None
    with hub_errors(f"{command} {ref}", repo, token):
        # asked first: the download below answers from the cache when the Hub refuses, so a wrong token
        # (401) or a repository the token cannot see would pass as "cached" without this question
        HfApi(endpoint=endpoint(), token=token).model_info(repo, revision=rev)
        for name in MODEL_FILES:
            path = Path(hf_hub_download(repo, name, revision=rev, endpoint=endpoint(), token=token))
    resolve_hub_ref(ref)  # a repo that is not a kdcli model fails here, after the download
    assert path is not None
    return path.parent




# -- the model card --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _dataset_name(data: str) -> str:
    kind, _, path = data.partition(":")
    if not path:
        return kind
    return Path(path.rstrip("/")).name or kind


def _teacher_metric(record: dict[str, Any], task: str) -> str:
    """The teacher's main metric, where known: a run/export folder's metrics, else the zoo's figure."""
    teacher = record.get("teacher") or {}
    if "metrics" in teacher:
        metrics = teacher["metrics"]
    else:
        tid = str(teacher.get("id") or "")
        folder = Path(tid)
        if tid.startswith(PREFIX):  # a pushed teacher: its cached config.json carries its metrics
            try:
                folder = resolve_hub_ref(tid).weights.parent  # type: ignore[union-attr]
            except KdcliError:
                folder = Path("/nonexistent")
        metrics = _read_json(folder / "metrics.json") or _read_json(folder / "config.json").get("metrics", {})
        if not metrics and teacher.get("spec"):
            try:
                from .zoo import raw_spec

                zoo = raw_spec(teacher["spec"]).metric
            except KdcliError:
                zoo = {}
            if zoo:
                return ", ".join(f"{k} {v}" for k, v in zoo.items()) + " (zoo, its own data set)"
    key = MAIN_METRIC[task]
    return f"{key} {float(metrics[key]):.4f}" if isinstance(metrics, dict) and key in metrics else "not recorded"


def _schedule(cfg: dict[str, Any]) -> str:
    parts = [
        f"{cfg.get('epochs')} epochs" if cfg.get("epochs") is not None else "",
        f"{cfg.get('optimizer')} lr {cfg.get('lr')}" if cfg.get("optimizer") else "",
        f"{cfg.get('schedule')} schedule" if cfg.get("schedule") else "",
        f"warm-up {cfg.get('warmup_iters')} iterations" if cfg.get("warmup_iters") is not None else "",
        f"weight decay {cfg.get('weight_decay')}" if cfg.get("weight_decay") is not None else "",
        f"grad clip {cfg['grad_clip']}" if cfg.get("grad_clip") else "",
        f"{cfg['amp']} autocast" if cfg.get("amp") not in (None, "none") else "",
    ]
    return ", ".join(p for p in parts if p) or "not recorded"


def _image_size(cfg: dict[str, Any], pp: dict[str, Any]) -> str:
    if cfg.get("image_size"):
        return str(cfg["image_size"])
    if "size" in pp:
        return str(pp["size"])
    return f"shorter side {pp.get('min_size')}, longer at most {pp.get('max_size')}"


def _subsets(record: dict[str, Any], cfg: dict[str, Any]) -> dict[str, tuple[int, int | None]]:
    """split -> (images used, split size or None if not recorded), for the splits the run cut short
    (``--max-train-images``/``--max-val-images``)."""
    images = record.get("images") or {}
    out: dict[str, tuple[int, int | None]] = {}
    for split, key in (("train", "max_train_images"), ("val", "max_val_images")):
        rec = images.get(split)
        if isinstance(rec, dict) and isinstance(rec.get("used"), int) and isinstance(rec.get("total"), int):
            if rec["used"] < rec["total"]:
                out[split] = (rec["used"], rec["total"])
        elif cfg.get(key):
            out[split] = (int(cfg[key]), None)
    return out


def _subset_text(subsets: dict[str, tuple[int, int | None]]) -> str:
    if not subsets:
        return "all images of both splits"
    names = {"train": "training", "val": "validation"}
    return "; ".join(f"{names[k]}: first {u}{f' of {t}' if t else ''} images" for k, (u, t) in subsets.items())


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json as it may be uploaded: local paths (data, out, teacher, student weights)
    replaced by :func:`public_id` names."""
    from .export import public_id

    out = json.loads(json.dumps(record))
    cfg = out.get("config") or {}
    for key in ("model", "teacher", "data", "student_weights"):
        if cfg.get(key) and cfg[key] not in ("zoo", "backbone"):
            cfg[key] = public_id(cfg[key])
    if cfg.get("out"):
        cfg["out"] = Path(str(cfg["out"])).name
    for role in ("student", "teacher"):
        if isinstance(out.get(role), dict) and out[role].get("id"):
            out[role]["id"] = public_id(out[role]["id"])
    return out


def build_card(run: Path, repo: str, export_config: dict[str, Any], baseline: Path | None = None,
               dataset: str | None = None, license: str | None = None, base_model: str | None = None) -> Any:
    """The model card: YAML metadata (library, tags, datasets, license, base model, model-index with
    the evaluated metrics) and a body with the distillation recipe, results and loading code."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .export import public_id
    from .zoo import ModelSpec

    spec = ModelSpec.from_dict(export_config["model"], "config.json")
    record = _read_json(run / "config.json")
    cfg = record.get("config", {})
    metrics = export_config.get("metrics") or _read_json(run / "metrics.json")
    task = spec.task
    data = dataset or _dataset_name(str(cfg.get("data", "unknown")))
    method = cfg.get("method")
    student_id = str(public_id(record.get("student", {}).get("id")) or spec.name)
    subsets = _subsets(record, cfg)
    split, split_name = "val", data
    if "val" in subsets:  # a score on part of the split is named as such, never as the split's
        used, total = subsets["val"]
        split, split_name = f"val[:{used}]", f"{data} (val: first {used}{f' of {total}' if total else ''} images)"
    base = base_model or (parse_ref(student_id)[0] if student_id.startswith(PREFIX) else spec.name)
    lic = (license or spec.license or "other").lower()
    methods = [m for m in str(method).split("+")] if method else []
    tags = ["kdcli", "knowledge-distillation", TASK_TAG[task], task, spec.architecture, *methods]
    evals = [
        EvalResult(task_type=TASK_TAG[task], dataset_type=data, dataset_name=split_name, dataset_split=split,
                   metric_type=k.lower(), metric_name=k, metric_value=round(float(metrics[k]), 4))
        for k in CARD_METRICS[task] if isinstance(metrics.get(k), (int, float)) and metrics[k] >= 0
    ]
    card_data = ModelCardData(
        library_name="kdcli", license=lic, tags=tags, datasets=[data], base_model=base,
        pipeline_tag=TASK_TAG[task], model_name=repo.split("/")[-1], eval_results=evals or None,
    )
    key = MAIN_METRIC[task]
    own = f"{float(metrics[key]):.4f}" if key in metrics else "not recorded"
    base_line = "not given (push with `--baseline RUN` to show it)"
    if baseline is not None:
        bm = _read_json(baseline / "metrics.json")
        base_line = f"{float(bm[key]):.4f}" if key in bm else f"not recorded in {public_id(str(baseline))}"
    teacher = dict(record.get("teacher") or {})
    if teacher:
        teacher["id"] = public_id(teacher.get("id"))
    hparams = {k: v.get("hparams") for k, v in (record.get("method") or {}).items()}
    ref = f"{PREFIX}{repo}"
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        f"A {task} model ({spec.architecture}, backbone `{spec.backbone}`, {len(spec.classes)} classes) "
        + (f"distilled with [kdcli](https://pypi.org/project/kdcli/) from the teacher `{teacher.get('id')}` "
           f"with `{method}`." if method else "trained with [kdcli](https://pypi.org/project/kdcli/) "
           "without distillation."),
        "",
        "## Distillation" if method else "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| student | `{student_id}` ({spec.name}) |",
    ]
    if teacher:
        lines.append(f"| teacher | `{teacher.get('id')}` ({teacher.get('spec')}): {_teacher_metric(record, task)} |")
    if method:
        lines.append(f"| method | `{method}` |")
        for name, hp in hparams.items():
            lines.append(f"| {name} hyper-parameters | `{json.dumps(hp, sort_keys=True)}` |")
    lines += [
        f"| schedule | {_schedule(cfg)} |",
        f"| effective batch | {record.get('effective_batch', cfg.get('batch_size'))} |",
        f"| inherit (neck/head from teacher) | {'yes' if cfg.get('inherit') else 'no'} |",
        f"| data | `{public_id(cfg.get('data')) or 'not recorded'}`, image size {_image_size(cfg, spec.preprocess)} |",
        f"| images used | {_subset_text(subsets)} |",
        f"| classes | {', '.join(spec.classes)} |",
        "",
        "## Results (validation split)" if "val" not in subsets else
        f"## Results (validation subset: {_subset_text({'val': subsets['val']}).split(': ', 1)[1]})",
        "",
        f"| model | {key} |",
        "|---|---:|",
    ]
    if teacher:
        lines.append(f"| teacher `{teacher.get('id')}` | {_teacher_metric(record, task)} |")
    if method:
        lines.append(f"| student baseline (no distillation) | {base_line} |")
    lines.append(f"| this model | {own} |")
    lines += [
        "",
        "All metrics: " + ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and k != "epoch") + ".",
        "",
        "## How to load",
        "",
        "```bash",
        "pip install kdcli",
        f"kdcli pull {ref}                      # into the Hugging Face cache",
        f"kdcli eval {ref} --data <your data>   # reads the cache only",
        f"kdcli distill --teacher {ref} --student <zoo name> --method <method>",
        "```",
        "",
        "```python",
        "from kdcli.models import build_model",
        "from kdcli.zoo import resolve_ref",
        "",
        f'ref = resolve_ref("{ref}")  # after `kdcli pull`',
        "model = build_model(ref.spec, ref.weights).eval()  # ref.spec: the architecture, classes, preprocessing",
        "net = model.net  # the plain torchvision/timm module",
        "```",
        "",
        "`model.safetensors` holds the student alone under torchvision/timm key names (no adapters or teacher);",
        "`config.json` holds the model spec, the provenance and the metrics; `run_config.json` the resolved run",
        "configuration; `results.csv` one row per epoch.",
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


# -- push -----------------------------------------------------------------------------------------------
def stage_push(run: Path, repo: str, formats: str | list[str] | None = None, baseline: Path | None = None,
               dataset: str | None = None, license: str | None = None, base_model: str | None = None) -> Path:
    """A temporary folder with everything that will be uploaded."""
    from .export import export
    from .io import save_json

    if not (run / "model.json").is_file():
        raise KdcliError(f"{run}: not a kdcli run folder (model.json missing)")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="kdcli-push-"))
    try:
        export(run, folder, formats)
        export_config = _read_json(folder / "config.json")
        card = build_card(run, repo, export_config, baseline, dataset, license, base_model)
        (folder / "README.md").write_text(str(card))
        if (run / "results.csv").is_file():
            shutil.copyfile(run / "results.csv", folder / "results.csv")
        for png in sorted(run.glob("*.png")):
            shutil.copyfile(png, folder / png.name)
        if (run / "config.json").is_file():  # without local paths (a home directory would be published)
            save_json(folder / "run_config.json", public_record(_read_json(run / "config.json")))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _refuse_token(folder: Path, token: str) -> None:
    needle = token.encode()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and needle in f.read_bytes():
            raise HubError(f"refusing to upload: {f.name} contains your Hub token")


def push(run: str | Path, repo: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         formats: str | list[str] | None = None, baseline: str | Path | None = None, dataset: str | None = None,
         license: str | None = None, base_model: str | None = None, log: Any = None) -> str:
    """Create ``repo`` if needed and commit the staged files; returns the commit or pull-request URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run = Path(run)
    check_repo_id(repo)
    token = token_or_fail()
    _require_online("kdcli push")
    base = Path(baseline) if baseline else None
    if base is not None and not (base / "metrics.json").is_file():
        raise KdcliError(f"--baseline {base}: no metrics.json (expected a finished run folder)")
    folder = stage_push(run, repo, formats, base, dataset, license, base_model)
    try:
        _refuse_token(folder, token)
        api = HfApi(endpoint=endpoint(), token=token)
        with hub_errors("kdcli push", repo, token, write=True):
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f))
                   for f in sorted(folder.iterdir()) if f.is_file()]
            info = api.create_commit(repo, ops, commit_message=f"kdcli push {run.name}", revision=revision,
                                     create_pr=create_pr, repo_type="model")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return str(info.pr_url or info.commit_url)


# the zoo and the weight fetcher sit below this module: they find its hf-hub code through these registrations
register_scheme(PREFIX, lambda ref: resolve_hub_ref(ref), lambda *a, **k: fetch(*a, **k))  # bound at call time
