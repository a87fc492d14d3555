import numpy as np
import pytest
import scipy.sparse as sp

from mom import graph as graph_module
from mom.errors import InputError
from mom.graph import (SearchSettings, graph_report, knn_search, method_device, neighbours_of, reciprocal_graph,
                       resolve_search_device, search_recall, visible_gpus)


def random_features(n=200, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_graph(features, n_other, gamma):
    """Eq. (1) from the definition: dense similarities, mutual n_other-NN (self excluded)."""
    sims = features.astype(np.float64) @ features.T.astype(np.float64)
    n = len(features)
    member = np.zeros((n, n), dtype=bool)
    for i in range(n):
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:n_other]
        member[i, others] = True
    mutual = member & member.T
    return np.where(mutual, np.maximum(sims, 0) ** gamma, 0.0)


@pytest.mark.parametrize("count_self", [True, False])
def test_exact_graph_equals_brute_force(count_self):
    features = random_features()
    k = 10
    ids, sims, method = knn_search(features, k, count_self=count_self)
    assert method == "exact"
    n_other = k - 1 if count_self else k
    assert ids.shape == (200, n_other)
    graph = reciprocal_graph(ids, sims, gamma=3).toarray()
    expected = brute_force_graph(features, n_other, gamma=3)
    np.testing.assert_array_equal(graph != 0, expected != 0)
    np.testing.assert_allclose(graph, expected, atol=1e-6)
    assert (graph == graph.T).all()
    assert (np.diag(graph) == 0).all()


def test_neighbour_lists_exclude_self_and_are_sorted():
    features = random_features(100)
    ids, sims, _ = knn_search(features, 30)
    assert ids.shape == (100, 29)  # authors' convention: the item counts among its k = 30
    assert not (ids == np.arange(100)[:, None]).any()
    assert (np.diff(sims, axis=1) <= 0).all()
    dense = features @ features.T
    np.fill_diagonal(dense, -np.inf)
    np.testing.assert_array_equal(ids[:, 0], dense.argmax(axis=1))


def test_duplicates_never_become_self_edges():
    features = random_features(60)
    features[[10, 11, 12, 13]] = features[10]  # four identical items
    ids, sims, _ = knn_search(features, 3)  # 2 other neighbours: duplicates can displace the item itself
    for item in (10, 11, 12, 13):
        assert item not in ids[item]
        assert set(ids[item]) <= {10, 11, 12, 13}
    graph = reciprocal_graph(ids, sims, gamma=3)
    assert graph.diagonal().sum() == 0
    assert abs(graph[10, 11] - 1) < 1e-5 or abs(graph[10, 12] - 1) < 1e-5
    assert (abs(graph - graph.T) > 0).nnz == 0


def test_opposite_mutual_neighbours_are_not_edges():
    features = np.array([[1, 0], [-1, 0]], dtype=np.float32)
    ids, sims, _ = knn_search(features, 1, count_self=False)
    graph = reciprocal_graph(ids, sims, gamma=3)
    assert graph.nnz == 0
    report = graph_report(graph)
    assert report["isolated_nodes"] == 2 and report["components"]["count"] == 2


@pytest.mark.parametrize("k", [5, 6])
def test_k_not_below_n_is_an_error(k):
    with pytest.raises(InputError, match="k=.*smaller than the number of items"):
        knn_search(random_features(5), k)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_rows_are_named(bad):
    features = random_features(50)
    features[7, 3] = bad
    features[31, 0] = bad
    with pytest.raises(InputError, match="rows 7, 31"):
        from mom.graph import check_features
        check_features(features)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_search_has_high_recall(method):
    features = random_features(2000, 8, seed=1)
    settings = SearchSettings(method=method, ivf_nlist=16, ivf_nprobe=8, hnsw_ef_search=128)
    ids, _, used = knn_search(features, 10, settings=settings)
    assert used == method
    assert not (ids == np.arange(2000)[:, None]).any()
    recall = search_recall(features, ids, np.arange(0, 2000, 10))
    assert recall > 0.95
    exact_ids, _, _ = knn_search(features, 10)
    assert search_recall(features, exact_ids, np.arange(0, 2000, 10)) == 1.0


def test_auto_switches_to_approximate_above_threshold():
    assert SearchSettings(exact_max_items=100).resolve(101) == "hnsw"
    assert SearchSettings(exact_max_items=100).resolve(100) == "exact"
    with pytest.raises(InputError, match="allowed"):
        SearchSettings(method="lsh").resolve(10)


def test_neighbours_of_matches_full_search():
    features = random_features(300)
    ids, sims, _ = knn_search(features, 21)
    anchor_ids, anchor_sims = neighbours_of(features, np.array([5, 17, 299]), 20)
    np.testing.assert_array_equal(anchor_ids, ids[[5, 17, 299]])
    np.testing.assert_allclose(anchor_sims, sims[[5, 17, 299]], atol=1e-6)


def test_report_counts_components_and_isolated_nodes():
    edges = [(0, 1), (1, 2), (3, 4)]
    rows, cols = zip(*edges)
    graph = sp.coo_matrix((np.ones(3), (rows, cols)), shape=(6, 6)).tocsr()
    graph = (graph + graph.T).tocsr()
    report = graph_report(graph)
    assert report["edges"] == 3
    assert report["isolated_nodes"] == 1
    assert report["components"] == {"count": 3, "count_without_isolated": 2, "largest": 3, "largest_fraction": 0.5}
    assert report["degree"]["max"] == 2 and report["degree"]["min"] == 0


@pytest.mark.parametrize("requested,gpus,expected", [
    ("cpu", 0, "cpu"), ("cpu", 2, "cpu"), ("auto", 0, "cpu"), ("auto", 1, "cuda"), ("cuda", 4, "cuda"),
])
def test_search_device_resolution(requested, gpus, expected):
    assert resolve_search_device(requested, gpus) == expected


@pytest.mark.parametrize("requested,gpus,message", [
    ("cuda", 0, "device: cuda needs the GPU build of faiss"),
    ("gpu", 2, "device: 'gpu' is not one of cpu, cuda, auto"),
])
def test_search_device_errors_name_the_option(requested, gpus, message):
    with pytest.raises(InputError, match=message):
        resolve_search_device(requested, gpus)


def test_visible_gpus_is_zero_without_the_gpu_build(monkeypatch):
    monkeypatch.setattr(graph_module.faiss, "get_num_gpus", lambda: 3, raising=False)
    assert visible_gpus() == 3
    monkeypatch.delattr(graph_module.faiss, "get_num_gpus")
    assert visible_gpus() == 0


def test_hnsw_stays_on_the_cpu():
    assert method_device("hnsw", "cuda") == "cpu"
    assert method_device("exact", "cuda") == method_device("ivf", "cuda") == "cuda"
    assert method_device("exact", "cpu") == "cpu"


@pytest.fixture
def gpu_copy_is_identity(monkeypatch):
    """faiss's CPU-to-GPU copy replaced by the identity: runs the plumbing of the
    cuda path (which index, blocks, nprobe, ordering) on the CPU. It does not test
    faiss on a GPU: no GPU here. Returns what was "copied" and the GPU parameters set."""
    copied = []

    def copy(index):
        copied.append(type(index).__name__)
        return index

    class ParameterSpace:
        def set_index_parameter(self, index, name, value):
            copied.append((name, value))
            graph_module.faiss.ParameterSpace().set_index_parameter(index, name, value)

    monkeypatch.setattr(graph_module.faiss, "index_cpu_to_all_gpus", copy, raising=False)
    monkeypatch.setattr(graph_module.faiss, "GpuParameterSpace", ParameterSpace, raising=False)
    return copied


def test_the_cuda_path_of_exact_search_gives_the_cpu_neighbours(gpu_copy_is_identity):
    features = random_features(500, 8, seed=2)
    features[[3, 4, 5]] = features[3]  # ties: ordered by id on either path
    settings = SearchSettings(method="exact", batch_size=128)
    cpu_ids, cpu_sims, _ = knn_search(features, 10, settings=settings)
    ids, sims, method = knn_search(features, 10, settings=SearchSettings(method="exact", batch_size=128, device="cuda"))
    assert method == "exact" and gpu_copy_is_identity == ["IndexFlatIP"]
    np.testing.assert_array_equal(ids, cpu_ids)
    np.testing.assert_allclose(sims, cpu_sims, atol=1e-6)


def test_the_cuda_path_of_ivf_moves_the_trained_index_and_keeps_nprobe(gpu_copy_is_identity):
    features = random_features(2000, 8, seed=1)
    common = dict(method="ivf", ivf_nlist=16, ivf_nprobe=8)
    cpu_ids, _, _ = knn_search(features, 10, settings=SearchSettings(**common))
    ids, _, _ = knn_search(features, 10, settings=SearchSettings(**common, device="cuda"))
    assert gpu_copy_is_identity == ["IndexIVFFlat", ("nprobe", 8)]
    np.testing.assert_array_equal(ids, cpu_ids)


def test_hnsw_with_device_cuda_is_not_copied(gpu_copy_is_identity):
    features = random_features(300, 8)
    _, _, method = knn_search(features, 10, settings=SearchSettings(method="hnsw", device="cuda"))
    assert method == "hnsw" and gpu_copy_is_identity == []


def test_gpu_search_refuses_more_neighbours_than_faiss_returns(gpu_copy_is_identity, monkeypatch):
    monkeypatch.setattr(graph_module, "GPU_MAX_K", 8)
    with pytest.raises(InputError, match="k=10: faiss searches at most 8"):
        knn_search(random_features(50), 10, settings=SearchSettings(method="exact", device="cuda"))
    knn_search(random_features(50), 10, settings=SearchSettings(method="hnsw", device="cuda"))  # HNSW: CPU
