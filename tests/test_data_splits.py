"""Split lists: both public line formats, finding split files, every list in ../shared/splits."""

from pathlib import Path

import pytest

from tam_jax.data.splits import find_split_files, read_split_list, read_splits, video_id

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_class_video_format_keeps_first_appearance_order(tmp_path):
    path = write(
        tmp_path / "trainlist03.txt",
        "air drumming/a_000001_000011\nair drumming/b\nzumba/c\nabseiling/d\n\n",
    )
    split = read_split_list(path)
    assert split.name == "train"
    assert split.classes == ("air drumming", "zumba", "abseiling")
    assert split.videos["air drumming"] == ("a_000001_000011", "b")
    assert split.items() == [("a_000001_000011", 0), ("b", 0), ("c", 1), ("d", 2)]
    assert split.num_videos == 4


def test_indexed_path_format_orders_by_index_and_names_classes_by_folder(tmp_path):
    path = write(
        tmp_path / "test_few_shot.txt",
        "test1//videos/Yo_Yo/v2.avi\ntest0//videos/Archery/v1.avi\ntest1//videos/Yo_Yo/v3.avi\n",
    )
    split = read_split_list(path)
    assert split.name == "test"
    assert split.classes == ("Archery", "Yo_Yo")
    assert split.videos["Yo_Yo"] == ("videos/Yo_Yo/v2.avi", "videos/Yo_Yo/v3.avi")
    assert video_id(split.videos["Yo_Yo"][0]) == "v2"


def test_indexed_id_format_names_classes_by_token(tmp_path):
    split = read_split_list(write(tmp_path / "vallist07.txt", "val10/5\nval2/7\nval2/8\n"))
    assert split.classes == ("val2", "val10")
    assert split.videos == {"val2": ("7", "8"), "val10": ("5",)}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("no_slash_here\n", "is not of the form <class>/<video>"),
        ("train0/1\nclass/2\n", "is not of the form <split><index>/<video>"),
        ("train0//a/x.mp4\ntrain0//b/y.mp4\n", "class index 0 is 'b' here but 'a' earlier"),
        ("a/x\na/x\n", "listed twice"),
    ],
)
def test_malformed_lists_name_the_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "trainlist.txt", text)
    with pytest.raises(ValueError, match=message) as error:
        read_split_list(path)
    assert str(path) in str(error.value)


def test_find_split_files_by_split_word(tmp_path):
    for name in ("trainlist03.txt", "vallist03.txt", "testlist03.txt", "README.txt", "notes.md"):
        write(tmp_path / name, "a/b\n")
    found = find_split_files(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        "train": "trainlist03.txt",
        "val": "vallist03.txt",
        "test": "testlist03.txt",
    }


def test_find_split_files_names_folder_when_missing_or_ambiguous(tmp_path):
    write(tmp_path / "train.txt", "a/b\n")
    write(tmp_path / "trainlist03.txt", "a/b\n")
    write(tmp_path / "test.txt", "a/b\n")
    with pytest.raises(ValueError) as error:
        find_split_files(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "no *.txt file with 'val'" in message
    assert "several files for 'train'" in message


# The README table of ../shared/splits: folder -> (classes, videos) for train, val, test.
CMN_SIZES = {"train": (64, 6400), "val": (12, 1200), "test": (24, 2400)}
EXPECTED = {
    "kinetics_CMN": CMN_SIZES,
    "ssv2_CMN": CMN_SIZES,
    "ssv2_OTAM": {"train": (64, 67013), "val": (12, 1926), "test": (24, 2857)},
    "ucf_ARN": {"train": (70, 9154), "val": (10, 1421), "test": (21, 2745)},
    "hmdb_ARN": {"train": (31, 4280), "val": (10, 1194), "test": (10, 1292)},
}
HYRSM_OF = {
    "hyrsm_kinetics100": "kinetics_CMN",
    "hyrsm_ssv2_full": "ssv2_OTAM",
    "hyrsm_ssv2_small": "ssv2_CMN",
    "hyrsm_ucf101": "ucf_ARN",
    "hyrsm_hmdb51": "hmdb_ARN",
}
needs_shared = pytest.mark.skipif(
    not SHARED_SPLITS.is_dir(),
    reason=f"public split lists not found at {SHARED_SPLITS} (shared/ beside the checkout)",
)


@pytest.fixture(scope="module")
def shared_splits():
    return {
        folder.name: read_splits(folder)
        for folder in sorted(SHARED_SPLITS.iterdir())
        if folder.is_dir()
    }


@needs_shared
def test_every_shared_list_is_parsed_and_accounted_for(shared_splits):
    assert set(shared_splits) == set(EXPECTED) | set(HYRSM_OF)


@needs_shared
@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_shared_lists_match_readme_counts(shared_splits, folder):
    for split_name, (num_classes, num_videos) in EXPECTED[folder].items():
        split = shared_splits[folder][split_name]
        assert (len(split.classes), split.num_videos) == (num_classes, num_videos), split_name
    if EXPECTED[folder] is CMN_SIZES:
        assert {len(v) for s in shared_splits[folder].values() for v in s.videos.values()} == {100}
    classes = [set(s.classes) for s in shared_splits[folder].values()]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])


@needs_shared
@pytest.mark.parametrize("folder", sorted(HYRSM_OF))
def test_hyrsm_lists_match_their_counterparts(shared_splits, folder):
    counterpart = shared_splits[HYRSM_OF[folder]]
    kinetics = folder == "hyrsm_kinetics100"
    # Kinetics ids are <11-character YouTube id>_<start>_<end>, and the hyrsm list names some files
    # without the time span; its README says it swaps 179/41/57 videos for others.
    swapped = {"train": 179, "val": 41, "test": 57} if kinetics else {}

    def ids(split):
        return {
            video_id(v)[:11] if kinetics else video_id(v)
            for vs in split.videos.values()
            for v in vs
        }

    for split_name, split in shared_splits[folder].items():
        other = counterpart[split_name]
        assert len(split.classes) == len(other.classes)
        assert split.num_videos == other.num_videos
        assert len(ids(split) - ids(other)) == swapped.get(split_name, 0), split_name
