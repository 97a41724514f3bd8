"""OpenMP's wait policy under load: PASSIVE only when the machine is already busy, never over the user's."""

from cascade_sd import omp_wait_policy


def test_passive_only_when_the_load_exceeds_the_cores():
    assert omp_wait_policy({}, load=0.3, cores=2) is None  # quiet: OpenMP's spinning default is fastest
    assert omp_wait_policy({}, load=3.4, cores=2) is None  # this workflow's own previous job and Snakemake
    assert omp_wait_policy({}, load=4.0, cores=2) == "PASSIVE"
    assert omp_wait_policy({}, load=10.0, cores=8) == "PASSIVE"


def test_the_users_setting_always_wins():
    assert omp_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, load=8.0, cores=2) is None
    assert omp_wait_policy({"OMP_WAIT_POLICY": ""}, load=8.0, cores=2) is None
