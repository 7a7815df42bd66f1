"""fedkey's Flower ServerApp: fl_core's federated averaging driven over a Flower Grid.

Plain path (default): `fl_core.flower.server_loop.run_rounds` with fedkey's own message protocol.
SecAgg+ path (`secagg = true`): Flower's `SecAggPlusWorkflow`, which in flwr 1.42 exists only for the
legacy strategy workflow; a `flwr.server.strategy.Strategy` adapter (`SecAggStrategy`) lets it drive
fedkey's round (same cohort, same learning rates, same server optimizer) and hands the securely
aggregated mean back to `RoundDriver`.

Outputs in `out-dir` (on the SuperLink machine): `checkpoint.pt` after every round (fl_core's format),
`history.jsonl`, and `result.json` with the final flat parameters' location.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid, ServerApp

from fedkey.io import write_json
from fl_core.flower.job import Job, build_simulation
from fl_core.flower.server_loop import RoundDriver, discover_users, log, run_rounds, wait_for_nodes
from fl_core.flower.wire import TrainIns, UserReport

app = ServerApp()

RESULT = "flower_result.json"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training to the configured budget and write what the in-process engine writes."""
    from fedkey.fl_stage import HISTORY, write_history
    from keyboard.checkpoint import save_model

    job = Job.from_run_config(context.run_config)
    t0 = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    out = Path(job.out_dir)
    nodes = wait_for_nodes(grid, job.expect_nodes, job.wait_nodes_s)
    if job.placement == "any":
        sim, model, tok = build_simulation(job, evaluate=True)
        holder = None
    else:
        where = discover_users(grid, nodes, job.round_timeout_s)
        sim, model, tok = build_simulation(job, population=sorted(where), evaluate=True)
        holder = lambda i: where[sim.population[i]]  # noqa: E731
    if job.resume and sim.restore():
        log(f"resuming after round {sim.state.round}")
    else:
        sim.checkpoint()
    log(f"{len(nodes)} SuperNodes, {len(sim.population)} users; setup {time.perf_counter() - t0:.1f} s")
    driver = RoundDriver(job, sim)

    def on_round(entry: dict[str, Any]) -> None:
        write_history(out, sim.history)
        acc = f", top-1 {100 * entry['eval']['test']['top1']:.1f}%" if "test" in entry.get("eval", {}) else ""
        log(f"round {entry['round']}: {entry['completed']}/{entry['selected']} users, loss {entry['loss']:.3f}, "
            f"{entry['tokens_total']:,} tokens, {entry['wall_s']:.2f} s{acc}")

    if job.secagg:
        run_secagg_rounds(grid, context, driver, holder, on_round)
    else:
        run_rounds(grid, driver, holder, on_round)
    write_history(out, sim.history)
    sim.spec.load_into(model, sim.full_params())
    h = sim.history
    result = {"rounds": sim.state.round, "tokens": sim.tokens, "seconds": time.perf_counter() - t0,
              "up_bytes": sim.up_total, "down_bytes": sim.down_total,
              "clients_used": sum(x["completed"] for x in h), "dropped": sum(x["dropped"] for x in h),
              "late": sum(x["late"] for x in h), "aborted": sum(x["aborted"] for x in h),
              "sat_out": sum(x["sat_out"] for x in h),
              "skipped_rounds": sum(bool(x["skipped"]) for x in h), "loss": h[-1]["loss"] if h else None,
              "engine": "flower", "secagg": job.secagg, "nodes": len(nodes), "population": len(sim.population)}
    save_model(out, model, tok, config=json.loads(str(context.run_config.get("config", "{}"))), result=result)
    write_json(out / RESULT, result)
    log(f"done: {sim.state.round} rounds, {sim.tokens:,} tokens in {time.perf_counter() - t0:.1f} s -> {out}")


# ---- SecAgg+ ----------------------------------------------------------------------------------------------------

class SecAggStrategy(Strategy):
    """Legacy Strategy facade over RoundDriver for Flower's SecAggPlusWorkflow.

    `configure_fit` returns the round's per-node instructions (prepared by the loop); `aggregate_fit`
    receives results whose parameters SecAgg+ has already replaced by the securely aggregated mean.
    """

    def __init__(self, grid: Grid, run_id: int) -> None:
        self.grid, self.run_id = grid, run_id
        self.plan: dict[int, TrainIns] = {}
        self.mean: np.ndarray | None = None
        self.reports: list[UserReport] = []
        self.failures = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Parameters come from the loop."""
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """One FitIns per node holding sampled users (lists travel as JSON: legacy configs hold scalars)."""
        out = []
        for node, ins in self.plan.items():
            cfg: dict[str, Scalar] = {"round": ins.round, "client_lr": ins.client_lr,
                                      "users": json.dumps(ins.users), "idx": json.dumps(ins.idx)}
            out.append((GridClientProxy(node, self.grid, self.run_id), FitIns(parameters, cfg)))
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the aggregate (identical in every result) and the per-user bookkeeping."""
        self.failures = len(failures)
        self.reports = []
        for _, res in results:
            for m in json.loads(str(res.metrics["reports"])):
                self.reports.append(UserReport(m["user"], m["idx"], m["n_examples"], m["n_tokens"], m["work_tokens"],
                                               m["loss"], m["sat_out"], None, {"nbytes": m["nbytes"]}))
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list:
        """No federated evaluation: fedkey evaluates the global model itself."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        """Nothing to aggregate (no federated evaluation)."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """No server-side evaluation through Flower."""
        return None


def run_secagg_rounds(grid: Grid, context: Context, driver: RoundDriver, holder: Callable[[int], int] | None,
                      on_round: Callable[[dict[str, Any]], None]) -> None:
    """fedkey's rounds with Flower's SecAgg+ doing the aggregation (plain weighted mean of node means)."""
    job, sim = driver.job, driver.sim
    strategy = SecAggStrategy(grid, context.run_id)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    cfg = job.fl
    # weights are integers (token counts by default); SecAgg+ scales each by 1/max_weight before quantizing
    per_user = {"tokens": cfg.max_messages * cfg.max_len, "examples": cfg.max_messages, "uniform": 1}[cfg.weighting]
    max_weight = float(per_user * math.ceil(job.fleet.overselect * cfg.clients_per_round))
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.67, clipping_range=job.secagg_clip,
                                  max_weight=max_weight, timeout=job.round_timeout_s)
    while not sim.done():
        t0 = time.perf_counter()
        nodes = sorted(grid.get_node_ids())
        live = set(nodes)
        if holder is None:
            eligible, selected = driver.select(np.ones(len(driver.population), dtype=bool))
            place = {i: nodes[k % len(nodes)] for k, i in enumerate(selected)}.__getitem__
        else:
            eligible, selected = driver.select(np.array([holder(i) in live for i in range(len(driver.population))]))
            place = holder
        strategy.plan = driver.instructions(selected, place)
        strategy.mean, strategy.reports = None, []
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: driver.round + 1, Key.START_TIME: time.time()})
        arrays = [sim.state.params.numpy()]
        if sim.spec.n_total > sim.spec.n_shared:  # FedPer: the local parameters' starting values ride along
            arrays.append(sim.init_local.numpy())
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(arrays)
        workflow(grid, legacy)
        got = {r.user for r in strategy.reports}
        failed = sum(1 for i in selected if driver.population[i] not in got)
        if strategy.mean is None:
            log(f"round {driver.round + 1}: secure aggregation did not complete (too few nodes answered); "
                "the model is unchanged this round")
        entry = driver.apply_mean(selected, strategy.reports, strategy.mean, failed, time.perf_counter() - t0)
        entry.update(eligible=int(eligible), nodes=len(nodes), wall_s=time.perf_counter() - t0)
        sim.checkpoint()
        on_round(entry)
