"""Files in a bucket: the path layer and the training runs against a local GCS server.

Every test here talks to a real GCS JSON API (`gcp-storage-emulator`, started by the
`gcs_bucket` fixture in conftest.py) through the production clients: gcsfs for files, tensorstore
for orbax's arrays. Nothing is mocked.
"""

import os

from rovit_jax import paths


def test_path_layer_reads_writes_lists_and_moves_in_a_bucket_as_on_disk(gcs_bucket, tmp_path):
    cwd_before = set(os.listdir())
    for root in (f"{gcs_bucket}/layer", str(tmp_path)):
        paths.write_json(f"{root}/a/b.json", {"x": 1})
        assert paths.read_json(f"{root}/a/b.json") == {"x": 1}
        assert paths.isdir(f"{root}/a") and paths.isfile(f"{root}/a/b.json")
        assert not paths.isfile(f"{root}/a") and not paths.exists(f"{root}/missing")
        assert paths.listdir(f"{root}/a") == ["b.json"]
        assert paths.glob(f"{root}/a/*.json") == [f"{root}/a/b.json"]
        assert paths.glob(f"{root}/a/*.txt") == []
        paths.rename(f"{root}/a", f"{root}/c")
        assert paths.listdir(f"{root}/c") == ["b.json"] and not paths.exists(f"{root}/a")
        with paths.open_file(f"{root}/c/t.txt", "w") as f:
            f.write("héllo")
        assert paths.read_text(f"{root}/c/t.txt") == "héllo"
        assert paths.size(f"{root}/c/t.txt") == len("héllo".encode())
        with paths.local_file(f"{root}/c/t.txt") as local:
            assert open(local, encoding="utf-8").read() == "héllo"
        paths.remove(f"{root}/c")
        assert not paths.exists(f"{root}/c/t.txt")
    assert set(os.listdir()) == cwd_before  # no local "gs:" folder
