"""Federated training of any torch module: the algorithm as small functions, apart from how clients run.

Algorithm (pure functions; what an in-process loop and a Flower ServerApp/ClientApp share):

    spec = ParamSpec.of(module, local=["out_bias"])         # flat layout: shared params, then FedPer-local ones
    state = server_init(spec.flatten(params)[:spec.n_shared], cfg)      # fl_core.server
    start = client_init(spec, state.params, own_local, init_local)      # fl_core.client
    upd = client_update(task, spec, state.params, client_id, data, lr, clip, own_local, init_local)
        # -> ClientUpdate(delta over shared params, n_examples, n_tokens, loss, local)
    enc, residual = Codec(cfg.compress, spec).encode(upd.delta, seeded_generator(seed, 7200, round, idx), residual)
    res = aggregator.aggregate([decode(e).numpy() ...], weights, ids, n_dropped)  # Aggregator protocol
    state = server_update(state, torch.from_numpy(res.mean), cfg, lr)            # sgd/momentum, adam, yogi, adagrad

A task (`fl_core.client.ClientTask`) is the only thing that knows the data: `client_data(client,
rng) -> ClientData` (this round's local batches), `loss(params, batch)` and, for the batched
executor, `lane_loss(stacked_params, batches)`. fedkey/fl_task.py is the keyboard's task.

Execution (`fl_core.executors.run_clients`): one client per core on worker threads (default),
one after another, or many clients stacked in one batched computation (`lanes`), all giving
the same result. `fl_core.simulation.Simulation` is the in-process round loop: fleet
(`fl_core.fleet`: availability, speed, deadline, over-selection, dropouts), client
training, compression (`fl_core.compress`), aggregation (`fl_core.aggregate`), server
step, checkpoints (`fl_core.checkpoint`) and per-client device state (`fl_core.store`:
FedPer parameters, error-feedback residuals). Settings: `fl_core.config` ([fl], [fleet]).
"""
