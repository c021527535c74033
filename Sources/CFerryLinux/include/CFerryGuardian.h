// The guardian of post-copy memory in another process (see guardian.c and
// Sources/FerrySystem/FaultGuardian.swift).
#ifndef CFERRY_GUARDIAN_H
#define CFERRY_GUARDIAN_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Forks a guardian that holds a copy of `uffd` (a userfaultfd of another
/// process) and waits on a pipe whose write end is returned in `*control`
/// (close-on-exec). A byte written to it dismisses the guardian: it exits
/// and drops its copy. End of file (every copy of the write end closed: the
/// caller died, however) makes it poison with UFFDIO_POISON every page of
/// `ranges` that is not present, then exit. `ranges` holds `range_count`
/// triples: [start, end) addresses in the uffd's process and the size of
/// the pages mapped there (the base page, or a hugetlb page size, to which
/// start and end are aligned: hugetlb memory is poisoned in whole huge
/// pages). Returns the guardian's pid, or -1 with errno set.
pid_t ferry_guardian_spawn(int uffd, const uint64_t *ranges, size_t range_count, int *control);

#endif
