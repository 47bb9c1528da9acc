"""The mutations `run.py` applies, one at a time: (name, file, exact snippet, replacement, tests).

Each is a bug someone could plausibly write or merge; the tests are the node ids that must catch it
(kept narrow so the whole check stays within minutes). The first entry is the canary (see __init__).
Snippets avoid files that change often; when one stops occurring exactly once, `run.py` says `stale`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]
    why: str = ""


TOK = "tests/text/test_tokenizer.py"
DS = "tests/train/test_deepspeed_config.py"
LABELER = "tests/eval/test_labeler.py"
PIPE = "tests/data/test_pipeline.py"
TENANTS = "tests/serving/test_tenants.py"
SHARDS = "tests/data/test_shards.py"
FLASH = "tests/kernels/test_flash_attention.py"

MUTATIONS: list[Mutation] = [
    # ---- location tokens (the canary first: a cheap test, and one of the four silent bugs of issue 20)
    Mutation("loc: no clamp at the right/bottom edge (bin 1024)", "cxrfm/text/tokenizer.py",
             "return min(NUM_LOC_BINS - 1, max(0, int(v / side * NUM_LOC_BINS)))",
             "return max(0, int(v / side * NUM_LOC_BINS))",
             (f"{TOK}::test_image_corners_and_edges_map_to_the_first_and_last_bins",
              f"{TOK}::test_every_emitted_location_token_is_one_vocabulary_id"),
             "a box touching the edge maps to <loc_1024>, which is no token"),
    Mutation("loc: rounding instead of floor", "cxrfm/text/tokenizer.py",
             "max(0, int(v / side * NUM_LOC_BINS))", "max(0, round(v / side * NUM_LOC_BINS))",
             (f"{TOK}::test_pixel_to_bin_is_floor_on_a_1024_pixel_side",), "half the pixels move one bin"),
    Mutation("loc: scaled by 1023 bins (one-bin drift)", "cxrfm/text/tokenizer.py",
             "max(0, int(v / side * NUM_LOC_BINS))", "max(0, int(v / side * (NUM_LOC_BINS - 1)))",
             (f"{TOK}::test_every_bin_centre_round_trips_exactly",), "upper bins drift down by one"),
    Mutation("loc: parse to bin starts, not centres", "cxrfm/text/tokenizer.py",
             "boxes.append(((x1 + 0.5) * sx, (y1 + 0.5) * sy, (x2 + 0.5) * sx, (y2 + 0.5) * sy))",
             "boxes.append((x1 * sx, y1 * sy, x2 * sx, y2 * sy))",
             (f"{TOK}::test_every_bin_centre_round_trips_exactly",), "boxes shift half a bin up-left"),
    Mutation("loc: width and height swapped when parsing", "cxrfm/text/tokenizer.py",
             "sx, sy = width / NUM_LOC_BINS, height / NUM_LOC_BINS",
             "sx, sy = height / NUM_LOC_BINS, width / NUM_LOC_BINS",
             (f"{TOK}::test_every_bin_centre_round_trips_exactly",), "wrong boxes on non-square images"),
    # ---- ZeRO config
    Mutation("zero: stage 2 runs as stage 1", "cxrfm/train/deepspeed_config.py",
             '"stage": ds.stage,', '"stage": 1 if ds.stage == 2 else ds.stage,', (DS,),
             "issue 20 silent bug: gradients not partitioned"),
    Mutation("zero: parameter offload takes the optimizer's device", "cxrfm/train/deepspeed_config.py",
             '("offload_param", ds.offload_param)', '("offload_param", ds.offload_optimizer)', (DS,),
             "copy-paste: offload_param silently follows offload_optimizer"),
    Mutation("zero: global batch forgets the workers", "cxrfm/train/deepspeed_config.py",
             "tr.micro_batch_size * tr.grad_accum * tr.num_workers", "tr.micro_batch_size * tr.grad_accum", (DS,),
             "DeepSpeed rejects it on more than one GPU"),
    Mutation("zero: 16-bit gather on save for stage 2 too", "cxrfm/train/deepspeed_config.py",
             "if ds.stage == 3:", "if ds.stage >= 2:", (DS,), "a stage-3-only option set for stage 2"),
    # ---- labels (the CheXpert-style labeler and the finding targets)
    Mutation("labeler: negation ignored for atelectasis", "cxrfm/eval/labeler.py",
             "elif R.NEG in governing:", 'elif R.NEG in governing and "Atelectasis" not in mention.labels:',
             (f"{LABELER}::test_negation_uncertainty_and_mention_for_every_finding",),
             'issue 20 silent bug: "No atelectasis." labelled positive'),
    Mutation("labeler: negative beats uncertain across mentions", "cxrfm/eval/labeler.py",
             "_PRIORITY = {1: 3, -1: 2, 0: 1}", "_PRIORITY = {1: 3, -1: 1, 0: 2}",
             (f"{LABELER}::test_report_level_labels_and_no_finding",), "CheXpert's aggregation order broken"),
    Mutation("labeler: No Finding despite an uncertain pathology", "cxrfm/eval/labeler.py",
             "if not any(v in (1, -1) for k, v in labels.items() if k not in NON_PATHOLOGY):",
             "if not any(v == 1 for k, v in labels.items() if k not in NON_PATHOLOGY):",
             (f"{LABELER}::test_negation_uncertainty_and_mention_for_every_finding",), "'Possible X.' gets No Finding"),
    Mutation("findings: uncertain counted as negative", "cxrfm/data/samples.py",
             "1.0 if v == 1 else (-1.0 if v == -1 else 0.0)", "1.0 if v == 1 else 0.0",
             (f"{PIPE}::test_finding_targets_follow_the_chexpert_labels",), "the auxiliary loss learns 'absent'"),
    # ---- loss masks
    Mutation("loss mask: the prompt's last token is labelled", "cxrfm/data/samples.py",
             "labels = [IGNORE] * len(prefix) + answer_ids",
             "labels = [IGNORE] * (len(prefix) - 1) + prefix[-1:] + answer_ids",
             (f"{PIPE}::test_examples_are_the_hand_written_sequences_with_answer_only_labels",),
             "one prompt token per example trained on"),
    Mutation("loss mask: answers without EOS", "cxrfm/data/samples.py",
             "answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [vocab[EOS]]",
             "answer_ids = tokenizer.encode(answer, add_special_tokens=False)",
             (f"{PIPE}::test_examples_are_the_hand_written_sequences_with_answer_only_labels",),
             "the model never learns to stop"),
    Mutation("truncation: image tokens cut with the prompt", "cxrfm/data/samples.py",
             "room_prompt = max(head_len, budget - len(answer_ids))", "room_prompt = budget - len(answer_ids)",
             (f"{PIPE}::test_truncation_keeps_images_and_the_answer_start",), "<image> slots and images disagree"),
    Mutation("loss mask: the model counts every position", "cxrfm/model/multitask.py",
             "counted = target != IGNORE", "counted = target >= IGNORE",
             ("tests/model/test_multitask.py::test_forward_backward_per_task",), "-100 targets reach the loss"),
    Mutation("finding loss: prior images count", "cxrfm/model/multitask.py",
             'keep = (target >= 0) & (roles != ROLES.index("prior")).unsqueeze(1)', "keep = target >= 0",
             ("tests/model/test_multitask.py::test_finding_loss_trains_the_vision_encoder_on_current_images_only",),
             "an older exam's image trained on today's labels"),
    # ---- attention masks (the Triton kernels; run under the interpreter)
    Mutation("attention: causal mask off by one (forward)", "kernels/flash_attention.py",
             "valid = valid & (offs_m[:, None] + diag >= cols[None, :])",
             "valid = valid & (offs_m[:, None] + diag > cols[None, :])",
             (f"{FLASH}::test_gradients_match_pytorch_sdpa",), "a token cannot see itself"),
    Mutation("attention: causal mask off by one (backward)", "kernels/_flash_attention_bwd.py",
             "pT = tl.where(rows[None, :] + diag >= offs_n[:, None], pT, 0.0)",
             "pT = tl.where(rows[None, :] + diag > offs_n[:, None], pT, 0.0)",
             (f"{FLASH}::test_gradients_match_pytorch_sdpa",), "dK/dV miss the diagonal"),
    Mutation("cross-entropy: ignored rows add to the loss", "kernels/cross_entropy.py",
             "tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))", "tl.store(LOSS + row, lse - target)",
             ("tests/kernels/test_cross_entropy.py::test_fp32_matches_reference",), "prompt tokens in the loss"),
    # ---- splits
    Mutation("split: per study, not per patient (phantoms)", "cxrfm/data/synthetic/studies.py",
             "split=split_of(patient_id, seed, split_fractions),", 'split=split_of(f"s{index}", seed, split_fractions),',
             ("tests/data/test_synthetic.py::test_patient_level_split_and_fractions",),
             "a patient's exams leak between train and test"),
    Mutation("split: val cut ignores the train share (sources)", "cxrfm/data/sources/base.py",
             "cut_train, cut_val = fractions[0] / total, (fractions[0] + fractions[1]) / total",
             "cut_train, cut_val = fractions[0] / total, fractions[1] / total",
             ("tests/data/sources/test_base.py::test_patient_split_is_stable_and_proportional",), "no val split"),
    # ---- checksums and manifests
    Mutation("shards: checksum never compared", "cxrfm/data/shards.py",
             'elif verify and store.sha256_of(p) != sh["sha256"]:', 'elif verify and len(sh["sha256"]) != 64:',
             (f"{SHARDS}::test_missing_dir_empty_manifest_and_checksum_exclusion",), "a damaged shard is trained on"),
    Mutation("shards: verify skips the checksum", "cxrfm/data/shards.py",
             'if hashlib.sha256(data).hexdigest() != sh["sha256"]:', "if not data:",
             (f"{SHARDS}::test_verify_reports_corrupt_sample_by_shard_and_key",), "cxrfm data verify misses changes"),
    Mutation("manifest: sample count not checked", "cxrfm/data/shards.py",
             'if len(samples) != sh["samples"]:', 'if len(samples) > sh["samples"]:',
             (f"{SHARDS}::test_verify_reports_a_shard_with_fewer_samples_than_its_manifest",),
             "a truncated shard passes verification"),
    Mutation("manifest: patients counted by study", "cxrfm/data/shards.py",
             '"patients": sorted({s.patient_id for s, _ in items}),', '"patients": sorted({s.study_id for s, _ in items}),',
             (f"{SHARDS}::test_manifest_counts_and_checksums",), "the manifest's patient counts are wrong"),
    # ---- auth and limits (serving/tenants.py)
    Mutation("auth: revoked keys still work", "serving/tenants.py",
             "if rec is None or rec.revoked:", "if rec is None:",
             (f"{TENANTS}::test_authenticate_good_bad_revoked_and_policy_edits",), "revocation does nothing"),
    Mutation("auth: any secret of a known key id is accepted", "serving/tenants.py",
             "name = rec.tenant if hmac.compare_digest(digest.hex(), rec.hash) else None", "name = rec.tenant",
             (f"{TENANTS}::test_authenticate_good_bad_revoked_and_policy_edits",), "the key id alone authenticates"),
    Mutation("auth: disabled tenants still served", "serving/tenants.py",
             "return tenant if tenant is not None and tenant.enabled else None", "return tenant",
             (f"{TENANTS}::test_authenticate_good_bad_revoked_and_policy_edits",), "enabled=false does nothing"),
    Mutation("auth: wrong secrets never throttled", "serving/tenants.py",
             "self._failure_tokens(rec.key_id, spend=True)", "pass",
             ("tests/serving/test_auth_limits.py::test_wrong_secret_flood_is_throttled_before_scrypt",),
             "a wrong-secret flood costs a scrypt each"),
    Mutation("limits: burst not capped", "serving/tenants.py",
             "tokens = min(float(burst), tokens + (now - stamp) * rate)", "tokens = tokens + (now - stamp) * rate",
             (f"{TENANTS}::test_token_bucket_rate_and_recovery",), "an idle tenant saves up an unlimited burst"),
    Mutation("limits: one request more than max_concurrency", "serving/tenants.py",
             "if len(held) >= max_concurrency:", "if len(held) > max_concurrency:",
             (f"{TENANTS}::test_concurrency_leases_release_and_expire",), "off by one"),
    Mutation("limits: leases never expire", "serving/tenants.py",
             "held = {k: t for k, t in self.leases.get(tenant, {}).items() if t > now}",
             "held = dict(self.leases.get(tenant, {}))",
             (f"{TENANTS}::test_concurrency_leases_release_and_expire",), "a lost release locks a tenant out"),
    # ---- cluster manifests
    Mutation("kube: GPU request dropped from the RayJob workers", "cxrfm/jobs/manifests.py",
             'worker_limits["nvidia.com/gpu"] = str(res["gpus_per_node"])', "pass",
             ("tests/test_jobs.py::test_rayjob_workers_request_the_specs_gpus",),
             "issue 20 silent bug: workers scheduled without GPUs"),
    # ---- evaluation
    Mutation("eval: acc@0.5 needs IoU above 0.5", "cxrfm/eval/evaluate.py",
             "float(np.mean([x >= 0.5 for x in v]))", "float(np.mean([x > 0.5 for x in v]))",
             ("tests/eval/test_evaluate.py::test_evaluate_metrics_match_hand_computed_values",), "the usual >= 0.5"),
]
