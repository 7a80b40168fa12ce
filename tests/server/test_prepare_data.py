"""`fedvid simulate` fills the clip caches the way its sites and its coordinator read them."""

from __future__ import annotations

import dataclasses

from client.dataset import load_clips
from client.node_config import NodeConfig
from client.site import cache_dir, clip_spec, federation_split, site_items
from client.synth import write_synthetic_dataset
from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
from privacy.face_models import provision_face_models
from simulations.federation import prepare_data, resolve_run_config


class CountingFaceAnonymizer(FaceAnonymizer):
    """The real anonymizer, counting the videos it anonymizes."""

    calls = 0

    def anonymize_frames(self, frames, **options):
        self.calls += 1
        return super().anonymize_frames(frames, **options)


def test_simulated_sites_find_their_videos_anonymized_as_they_anonymize_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDVID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDVID_FACE_MODELS", str(provision_face_models()["short_range"].parent))
    data = write_synthetic_dataset(tmp_path / "data", seed=2, videos_per_class=3)
    config = resolve_run_config(f'data-dir="{data}" test-fraction=0.25')
    site_config = {"anonymize-mode": "faces+heads", "anonymize-int8": False, "anonymize-smallest-face": 20,
                   "cache-dir": str(tmp_path / "site-cache")}
    prepare_data(config, 2, site_config)
    node = NodeConfig.from_mapping({**site_config, "partition-id": 0, "num-partitions": 2})
    for site in range(2):
        _, items = site_items(config, dataclasses.replace(node, partition_id=site))
        at_the_site = CountingFaceAnonymizer(AnonymizerSettings.for_mode("faces+heads", 20, int8=False))
        load_clips(items, clip_spec(config), at_the_site, cache_dir(node), workers=1)
        assert at_the_site.calls == 0, f"site {site} anonymized {at_the_site.calls} videos again"
    _, _, test = federation_split(config)
    at_the_coordinator = CountingFaceAnonymizer(AnonymizerSettings())
    load_clips(test, clip_spec(config), at_the_coordinator, cache_dir(), workers=1)
    assert test and at_the_coordinator.calls == 0
