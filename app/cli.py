"""The `llmrec` command line. A mistake the user can fix (missing folder, bad parameter,
unreadable file) prints one message naming it and exits with code 2, no traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from llmrec.config import NIGHTLY_CRON, NIGHTLY_TIMEZONE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llmrec")
# The temporary Prefect server of `llmrec nightly` / `demo` starts slowly on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmrec: a continual-learning recommender on a pretrained language model.")
data_app = typer.Typer(no_args_is_help=True, help="Write landing drops (events/, items/, users/ Parquet).")
app.add_typer(data_app, name="data")
alerts_app = typer.Typer(no_args_is_help=True, help="Notifications through Prefect automations.")
app.add_typer(alerts_app, name="alerts")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of `llmrec api` (stored hashed in LLMREC_HOME).")
app.add_typer(keys_app, name="api-key")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def guarded(function):
    """Run a command body, turning user errors into one line and exit code 2."""
    from llmrec.errors import LlmrecError

    try:
        return function()
    except LlmrecError as error:
        fail(str(error))


def nightly_config(config_file: Optional[Path] = None, sets: list[str] = (), **fields):
    from llmrec.config import NightlyConfig

    return guarded(lambda: NightlyConfig.from_sources(config_file, sets, **fields))


@data_app.command("movielens")
def data_movielens(
    source: Path = typer.Option(..., help="MovieLens-100k folder (u.data, u.item, u.user, u.genre)."),
    out: Path = typer.Option(..., help="Folder to write the drops into."),
    period: str = typer.Option("1D", help="One drop per 1D (day) or 7D (week) after the bootstrap."),
    bootstrap_days: int = typer.Option(28, help="Days of history in the first drop."),
) -> None:
    """Turn MovieLens-100k into time-ordered landing drops."""
    from llmrec.data import movielens_drops

    tags = guarded(lambda: movielens_drops(source, out, period=period, bootstrap_days=bootstrap_days))
    typer.echo(f"wrote {len(tags)} drops to {out} ({tags[0]} .. {tags[-1]})")


@data_app.command("synthetic")
def data_synthetic(
    out: Path = typer.Option(..., help="Folder to write the drops into."),
    users: int = typer.Option(300, help="Number of users."),
    items: int = typer.Option(400, help="Number of items (about 60% exist on day 1)."),
    days: int = typer.Option(14, help="Number of daily drops."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write synthetic drops: items with text, users with latent tastes, new items, drift."""
    from llmrec.data import synthetic_drops

    tags = guarded(lambda: synthetic_drops(out, users=users, items=items, days=days, seed=seed))
    typer.echo(f"wrote {len(tags)} drops to {out} ({tags[0]} .. {tags[-1]})")


@app.command("nightly")
def nightly_command(
    landing: Optional[str] = typer.Option(None, help="Landing folder or URI."),
    home: Optional[str] = typer.Option(None, help="State folder (default $LLMREC_HOME or ./.llmrec)."),
    config: Optional[Path] = typer.Option(None, help="JSON file with NightlyConfig fields."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set training.epochs=5."),
    fail_on_invalid: Optional[bool] = typer.Option(None, "--fail-on-invalid/--continue-on-invalid"),
    wait: Optional[float] = typer.Option(None, "--wait", help="Seconds to wait for a run holding the home's lock."),
) -> None:
    """Run the nightly-retrain flow once (on a temporary Prefect server if PREFECT_API_URL is unset)."""
    cfg = nightly_config(config, set_, landing=landing, home=home, fail_on_invalid=fail_on_invalid, lock_wait=wait)

    def run():
        from flows.nightly import nightly_retrain
        from llmrec.config import Home
        from llmrec.ingest import open_landing
        from llmrec.lock import exclusive

        # A held lock or an unreachable landing is found before a flow run exists: one line,
        # exit 2, no retries, no failed flow run. The flow takes the lock again (re-entrant).
        open_landing(cfg.landing)
        with exclusive(Home(cfg.home), cfg.lock_wait):
            return nightly_retrain(config=cfg)

    summary = guarded(run)
    typer.echo(json.dumps({k: summary[k] for k in ("run", "status", "version", "note")}, default=str))


@app.command("demo")
def demo_command(
    ml100k: Optional[Path] = typer.Option(None, envvar="ML100K_DIR", help="MovieLens-100k folder; synthetic data if unset."),
    nights: int = typer.Option(4, help="Consecutive nights to run after the first."),
    workdir: Path = typer.Option(Path("demo-data"), help="Where drops and landing go (rebuilt on every run)."),
    home: Optional[Path] = typer.Option(None, help="State folder (default WORKDIR/home); must be new or empty "
                                                   "when outside WORKDIR."),
    set_: list[str] = typer.Option([], "--set", help="Override a NightlyConfig field."),
) -> None:
    """Build drops, then run the nightly flow night after night and print what happened."""
    from app.demo import run_demo
    from llmrec.config import parse_sets

    guarded(lambda: run_demo(ml100k, nights, workdir, parse_sets(set_), home))


@app.command("versions")
def versions_command(
    home: Optional[str] = typer.Option(None), model: str = typer.Option("llmrec"),
    compare: Optional[tuple[str, str]] = typer.Option(
        None, help="Two versions A B: their metrics, and both scored on the same rows (the later one's night)."),
    set_: list[str] = typer.Option([], "--set", help="Override a NightlyConfig field for --compare, e.g. "
                                                     "--set gate.resamples=500."),
) -> None:
    """List the registered model's versions with aliases and decisions, or compare two."""
    from llmrec import registry
    from llmrec.config import Home, default_home

    state = Home(home or default_home())
    registry.configure(state, "llmrec")
    if compare:
        cfg = nightly_config(None, set_, home=str(state.root))

        def rescore(a: str, b: str) -> str:
            from llmrec.compare import paired_comparison

            return paired_comparison(state, model, a, b, cfg)

        typer.echo(guarded(lambda: registry.compare_versions(model, *compare, rescore=rescore)))
        return
    frame = guarded(lambda: registry.version_history(model))
    typer.echo(frame.to_string(index=False) if len(frame) else f"no versions of {model!r} yet")


@alerts_app.command("install")
def alerts_install(webhook: str = typer.Option(..., help="URL the notifications are POSTed to.")) -> None:
    """Create Prefect automations (on PREFECT_API_URL) notifying WEBHOOK of promoted, rejected,
    failed and crashed nights, drift and quarantined files."""
    from app.alerts import install

    for name in guarded(lambda: install(webhook)):
        typer.echo(f"installed automation {name!r}")


@app.command("history")
def history_command(home: Optional[str] = typer.Option(None), model: str = typer.Option("llmrec")) -> None:
    """Which version was champion when, and why it changed (promotion, rollback), from the registry."""
    from llmrec import registry
    from llmrec.config import Home, default_home
    from llmrec.report import render_table

    registry.configure(Home(home or default_home()), "llmrec")
    frame = guarded(lambda: registry.champion_history(model))
    if frame.empty:
        typer.echo(f"{model!r} has had no champion yet")
        return
    typer.echo(render_table(frame.to_dict("records"), style="text"))


@app.command("monitor")
def monitor_command(home: Optional[str] = typer.Option(None), experiment: str = typer.Option("llmrec")) -> None:
    """Print the served champion's metrics, the drift share and the rating consistency, night after night."""
    from llmrec import registry
    from llmrec.config import Home, default_home
    from llmrec.report import render_table

    registry.configure(Home(home or default_home()), experiment)
    trend = guarded(lambda: registry.trend_table(experiment))
    if trend.empty:
        typer.echo(f"no nights recorded in experiment {experiment!r} yet")
        return
    typer.echo(render_table(trend.reset_index().to_dict("records"), style="text"))


@app.command("rollback")
def rollback_command(
    version: Optional[str] = typer.Option(None, help="Version to make champion (default: alias 'previous')."),
    home: Optional[str] = typer.Option(None),
    model: str = typer.Option("llmrec"),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for a nightly run holding the home's lock."),
) -> None:
    """Move the champion alias back; nothing is deleted. Takes the home's lock, so it never
    races with a night's gate."""
    from llmrec import registry
    from llmrec.config import Home, default_home
    from llmrec.lock import exclusive

    state = Home(home or default_home())
    registry.configure(state, "llmrec")

    def move_alias() -> str:
        with exclusive(state, wait):
            return registry.rollback(model, version)

    champion = guarded(move_alias)
    typer.echo(f"{model}: champion is now version {champion}")


@app.command("serve")
def serve_command(
    landing: Optional[str] = typer.Option(None), home: Optional[str] = typer.Option(None),
    cron: str = typer.Option(NIGHTLY_CRON, help="Nightly schedule."),
    timezone: str = typer.Option(NIGHTLY_TIMEZONE, help="Timezone of the schedule (an hour that exists every day)."),
) -> None:
    """Serve the nightly (cron) and manual deployments against PREFECT_API_URL."""
    from app.serve import serve

    cfg = nightly_config(landing=landing, home=home)
    guarded(lambda: serve(cfg, cron, timezone))


def api_config(**fields):
    from llmrec.config import ApiConfig, load_config

    compression = {k: fields.pop(k) for k in ("quantize", "prune", "encoder_layers") if fields.get(k) is not None}
    return guarded(lambda: load_config(ApiConfig, fields.pop("config_file", None), fields.pop("sets", ()),
                                       compression=compression or None, **fields))


@app.command("api")
def api_command(
    home: Optional[str] = typer.Option(None, help="LLMREC_HOME (default $LLMREC_HOME or ./.llmrec)."),
    host: Optional[str] = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default 1)."),
    poll: Optional[float] = typer.Option(None, help="Seconds between checks of the champion alias (default 30)."),
    model: Optional[str] = typer.Option(None, help="Registered model name (default llmrec)."),
    quantize: Optional[str] = typer.Option(None, help="none or int8 (encoder Linear layers + item matrix)."),
    prune: Optional[float] = typer.Option(None, help="L1-unstructured pruning of the encoder's Linear weights, 0..1."),
    encoder_layers: Optional[int] = typer.Option(None, help="Serve with only the encoder's first N layers."),
    config: Optional[Path] = typer.Option(None, help="JSON file with ApiConfig fields."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set max_pairs=500."),
    access_log: bool = typer.Option(False, help="Log every request (off: the metrics count them)."),
) -> None:
    """Serve recommendations of the registry's champion version over HTTP (FastAPI + uvicorn)."""
    cfg = api_config(home=home, host=host, port=port, workers=workers, poll_seconds=poll, registered_model=model,
                     quantize=quantize, prune=prune, encoder_layers=encoder_layers, config_file=config, sets=set_)
    from app.api import run

    guarded(lambda: run(cfg, access_log=access_log))


def key_store(home: Optional[str]):
    from llmrec.config import Home, default_home
    from llmrec.keys import KeyStore, keys_file

    return KeyStore(keys_file(Home(home or default_home()).root))


@keys_app.command("create")
def api_key_create(
    name: str = typer.Option(..., help="Who or what uses the key."),
    scope: str = typer.Option("read", help="read (recommendations, scores, readiness, metrics) or admin (also reload)."),
    home: Optional[str] = typer.Option(None),
) -> None:
    """Create a key and print it once; only its salted hash is stored."""
    store = key_store(home)
    key = guarded(lambda: store.create(name, scope))
    typer.echo(key)
    typer.echo(f"stored the hash of {scope} key {name!r} in {store.path}; the key itself is not kept, copy it now",
               err=True)


@keys_app.command("list")
def api_key_list(home: Optional[str] = typer.Option(None)) -> None:
    """List keys (id, name, scope, created, revoked); never the keys themselves."""
    from llmrec.report import render_table

    entries = guarded(lambda: key_store(home).list())
    rows = [{"id": e.key_id, "name": e.name, "scope": e.scope, "created": e.created, "revoked": e.revoked or ""}
            for e in entries]
    typer.echo(render_table(rows, ["id", "name", "scope", "created", "revoked"], style="text") if rows else "no API keys")


@keys_app.command("revoke")
def api_key_revoke(name_or_id: str = typer.Argument(..., help="Key id or name."),
                   home: Optional[str] = typer.Option(None)) -> None:
    """Revoke a key (kept in the file, marked revoked); the running service refuses it at once."""
    revoked = guarded(lambda: key_store(home).revoke(name_or_id))
    typer.echo(f"revoked {', '.join(revoked)}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
