"""Shared fixtures: one local Ray per test session, real data copied to temp dirs, a local S3 server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

# One torch thread per process: OpenMP spinning on 2 shared cores makes runs 10-30x slower, and the
# tokenize contract fixes the thread count anyway (RuntimeConfig.threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and each
# of its steps (start, run, finish, restart) waits for a poll: 0.5 s takes ~6 s off every Ray Train run here
# (17.5 -> 10.4 s for a 2-worker run of 3 reports). The session's Ray and every `lumo` subprocess inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray workers inherit the environment Ray was started with, and the session's Ray starts after
# collection: the local S3 server's (fake) credentials must be set now for tasks and Train workers.
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_k, _v)
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("LUMO_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A private copy of ../shared/data/real (tests never write to shared/)."""
    if not REAL.exists():
        pytest.fail(f"real data not found at {REAL} (set LUMO_REAL_DATA)")
    dst = tmp_path_factory.mktemp("real") / "real"
    shutil.copytree(REAL, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


# Two fake GPUs: Ray hands out their ids, torch finds no CUDA and computes on CPU, so each job's GPU
# request is tested end to end on this CPU machine (tests/test_gpu_requests.py); CPU-only jobs never see them.
SESSION_RAY = dict(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (never one per test)."""
    import ray

    if not ray.is_initialized():
        ray.init(**SESSION_RAY)
    yield ray
    ray.shutdown()


S3_BUCKET = "lumo"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port and a bucket; yields uri(prefix) -> s3://... URI."""
    try:
        import moto.server  # noqa: F401  (moto[server]: flask, werkzeug; in the [test] extra)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"needs a local S3 server: pip install 'moto[server]' ({e})")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto server did not start on port {port} (see {log.name})")
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield lambda prefix: f"s3://{S3_BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def sole_local_ray():
    """A `lumo` subprocess's own local Ray is the only one on the machine while it runs: with several,
    Ray Train's placement-group cleaner cannot tell which is its cluster and dies with a traceback (Ray
    2.60; a user running two at once gives --address). The session's Ray, if up, comes back afterwards."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    if was:
        ray.init(**SESSION_RAY)


# -- the fast tier: `pytest -m "not slow" tests` ----------------------------------------------------
# The tests below are marked slow: each trains for tens of seconds, runs Ray Train / Tune runs, starts
# a server or a cluster, or runs the demo. Seconds: their call + the fixtures only they use, measured
# one module at a time on the shared 2-core dev machine under a load of 5-30 (about 3x CI's: the full
# suite summed 3923 s there, CI ran it in 1759 s with the demo). Every module keeps its fast tests;
# "*" marks a module whose every test needs such a fixture or run. A name is a test function (all its
# parameters) or one parameter's full id.
SLOW = {
    "test_console.py": {"test_a_ray_driver_console_through_a_pipe_has_no_cpp_lines_nor_colour_codes"},  # 10 s (idle): a Ray driver
    "test_audio_codec.py": {"test_preset_weights_are_the_same_under_every_cpu_kernel_build"},  # 14 s: one process per kernel build
    "test_caption_accuracy.py": {"test_fidelity_report_carries_captions_and_field_metrics"},  # 36 s: the fidelity shards
    "test_audio_codec_trained.py": {"test_train_audio_writes_weights_and_metrics_and_is_deterministic",  # 27 s: two trainings
                                    "test_identity_is_the_weights_digest_and_changes_with_them"},
    "test_audit.py": {"test_audit_passes_on_tiny_preset", "test_audit_against_own_baseline_passes_and_doctored_fails",  # 28 + 48 s
                      "test_audit_applies_the_committed_baseline_by_default", "test_audit_seed_images_and_48k_stereo_audio"},  # 31 + 19 s
    "test_batch_generate.py": {"test_one_and_two_actors_write_the_same_bytes", "test_a_run_stopped_midway_finishes_the_rest",  # 25 + 33 s + the seed-3 run both read: 21 s (load 2-3)
                               "test_a_record_that_cannot_be_generated_is_an_error_row"},  # 9 + 4.5 s (idle)
    "test_checkpoint_integrity.py": {"test_a_flipped_byte_in_the_checkpoint_ray_restores_is_refused_in_the_worker"},  # 51 s: Ray Train
    "test_clip_kmeans.py": {"*"},  # 55 s: the CLIP k-means pipeline every test reads
    "test_clip_preset.py": {"test_train_clip_gives_the_same_bytes_in_two_processes"},  # 20 s
    "test_codec_train.py": {"*"},  # 76 s: the two trainings every test reads
    "test_dedup.py": {"test_planted_duplicates_are_found_and_no_distinct_image_is_dropped",  # 33 s: the curated set
                      "test_clip_score_filter_drops_below_its_threshold_with_the_score"},
    "test_data_quickstart.py": {"test_the_readme_quick_start_runs_as_written",  # 131-145 s: six commands, Ray Train
                                "test_two_manifests_make_the_shards_of_their_concatenation"},  # 16-34 s: a tokenize
    "test_demo.py": {"test_demo_console_is_one_line_per_event_from_any_directory",  # the demo, in two runs: 8-10 min
                     "test_demo_training_stages_console"},
    "test_embed.py": {"test_actor_count_does_not_change_bytes_and_rerun_resumes"},  # 18-37 s at load 8 (+ the 1-actor run the fast tier's test reads)
    "test_export.py": {"test_hf_export_loads_with_transformers_alone", "test_onnx_parity_and_int8",  # 11 + 2 s (load 8)
                       "test_onnx_lm_stands_in_for_the_pytorch_model"},  # 7 s, + the int8 export both ONNX tests read: 9 s
    "test_fidelity.py": {"test_oracle_generations_pass_and_caption_blind_ones_fail", "test_x2t_only_run_fails",  # 53 + 15 s
                         "test_untrained_run_fails_through_generation_and_is_deterministic", "test_cli_exit_status_and_verdict"},
    "test_fsdp.py": {"test_two_fsdp_workers_match_ddp_resume_exactly_and_reshard",  # 252 s: Ray Train runs
                     "test_base_lm_fsdp_matches_ddp_and_its_checkpoint_resumes_on_one_worker",  # 31 s at load 8 (was 63 there)
                     "test_vlm_fsdp_matches_ddp_restarts_from_its_shards_and_reshards"},  # 220 s
    "test_fsdp_meta.py": {"test_two_workers_meta_equals_the_whole_build_and_exports_whole"},  # 140 s: Ray Train
    "test_generate_decode.py": {"test_constrained_media_spans_comply_untrained_but_captions_must_end"},  # 16 s
    "test_gpu_requests.py": {"test_train_workers_get_gpus_and_train_the_cpu_weights",  # 47 s: Ray Train runs
                             "test_serve_replicas_get_gpus_and_answer_the_cpu_bytes",  # 38 s: Serve
                             "test_batch_generation_actors_get_gpus_and_write_the_cpu_bytes"},  # 18 s
    "test_image_vq.py": {"test_tiny_fit_is_deterministic_across_processes_and_threads"},  # 26 s
    "test_lm_base.py": {"*"},  # 44 s: `lumo train lm`
    "test_mmpt_train.py": {"test_cli_trains_on_ray_with_two_workers",  # 48 + 72 s: Ray Train, ddp and fsdp
                           "test_two_trial_mmpt_study_writes_its_table_and_constraints"},  # 26 s: Tune
    "test_multinode.py": {"*"},  # 223 s (load 5-6): a two-node cluster
    "test_openai_api.py": {"*"},  # 49 s: a server of its own (test_serve.py's serves the fast tier)
    "test_pixel_probe.py": {"*"},  # 24 + 11 s: three CNN fits
    "test_plan.py": {"test_reference_table_and_config_plan"},  # 8 s (idle): every reference config planned
    "test_real_data_pipeline.py": {"*"},  # 43 s: normalize -> tokenize -> train on the real samples
    "test_seed_tokenize.py": {"*"},  # 30 s
    "test_serve.py": {"test_sigint_stops_the_server_cleanly"},  # 8 s, and it stops the module's server
    "test_serve_security.py": {"test_bearer_scheme_is_case_insensitive_and_the_token_exact",  # 20 s: a server of its own
                               "test_an_oversize_prompt_is_a_fast_422_and_holds_no_other_request_up",
                               "test_a_prompt_over_the_token_limit_or_max_len_is_a_422_naming_prompt",
                               "test_bodies_the_parser_cannot_read_are_400_never_500",
                               "test_health_answers_while_generation_requests_are_queued",
                               "test_every_request_is_in_the_access_log_without_token_or_body",
                               "test_a_lost_replica_answers_its_in_flight_requests_503_with_retry_after"},
    "test_storage_gcs.py": {"test_tokenize_to_gs_same_bytes_as_local", "test_reader_reads_gs_shards_like_local"},  # 27 s: tokenize
    "test_storage_uri.py": {"test_tokenize_to_s3_same_bytes_and_rerun_skips", "test_interrupted_s3_run_resumes_to_identical_bytes",
                            "test_normalize_to_s3_writes_the_local_bytes", "test_reader_reads_s3_shards_like_local",
                            "test_verify_on_s3_passes_then_fails_on_corrupted_shard",  # with the tokenize above: 30 + 24 s
                            "test_token_lm_trains_on_s3_checkpoints_to_s3_and_resumes",  # 32 s
                            "test_run_directories_on_s3_train_evaluate_and_generate",  # 34 s
                            "test_raw_dataset_and_media_on_s3_normalize_tokenize_and_verify"},  # 11 s
    "test_token_lm_train.py": {"test_ray_train_ddp_two_workers", "test_a_shard_with_a_flipped_byte_stops_training_naming_it"},  # 18 + 16 s
    "test_token_lm_tune.py": {"test_two_trial_prompt_study"},  # 40 s: Tune
    "test_tokenize_timings.py": {"test_without_a_loader_pool_or_with_calls_at_once_the_actors_write_the_same_bytes"},  # 19 s: three media runs
    "test_tokenize_verify.py": {"test_actor_count_does_not_change_bytes_and_rerun_skips",  # 71 s
                                "test_interrupted_run_resumes_to_identical_output", "test_bad_samples_recorded_job_completes",  # 14 + 20 s
                                "test_killed_run_restarts_to_identical_output",  # 28 s
                                "test_a_killed_shard_writer_is_redone_and_the_output_is_unchanged"},  # 14 s
    "test_tune_train_trials.py": {"test_ray_train_trials_reach_the_losses_of_the_same_runs_alone",  # 168 s: Tune + Ray Train
                                  "test_vlm_sweep_trials_get_their_gpu_and_the_cpu_verdict",  # 34 s
                                  "test_token_lm_study_trials_get_their_gpu_and_the_cpu_verdict"},  # 18 s + the shards
    "test_vlm_stream.py": {"test_ray_data_stream_is_ordered_and_the_same_with_1_or_2_actors",  # 21 s
                           "test_vlm_trains_on_media_read_from_an_object_store"},  # 8 s + the S3 server
    "test_vlm_train.py": {"test_resume_5_plus_5_equals_10_straight",  # 13 s (exact resume: test_token_lm_train's is fast)
                          "test_activation_checkpointing_gives_the_same_losses",  # 8 s (idle)
                          "test_ray_train_ddp_restarts_failed_worker_from_checkpoint",  # 115 s: Ray Train
                          "test_sweep_runs_four_trials_in_separate_dirs",  # 59 s: Tune
                          "test_trained_tiny_vlm_passes_ablation", "test_untrained_connector_fails_ablation"},  # 22 + 17 s
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW.get(item.path.name, ())
        if "*" in names or item.name in names or getattr(item, "originalname", None) in names:
            item.add_marker(pytest.mark.slow)
