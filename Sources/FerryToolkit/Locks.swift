// The lock kinds Ferry uses, and when to use which:
// - `Mutex` (the standard library's Synchronization module) for data shared
//   between threads or tasks: hold it briefly, never across a blocking call
//   or an `await`.
// - `ReadWriteLock` where many readers must proceed together and a writer
//   must exclude them all (reading pages while a scan re-arms them).
// - `ConditionLock` where a dedicated thread must sleep until another thread
//   hands it work (queues between the loop thread and a worker).
// `Atomic` values are for single words (counters, flags), not locks.
#if canImport(Glibc)
import Glibc
#endif

/// Many readers or one writer. Writers are preferred by default, so a
/// steady stream of readers cannot hold a writer off; a lock that one thread
/// may take shared twice (nested) must prefer readers, or a waiting writer
/// would deadlock it.
public final class ReadWriteLock: @unchecked Sendable {
    // `@unchecked Sendable` invariant: the pthread lock is allocated here, never moves, and is destroyed only in deinit.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init(preferWriters: Bool = true) {
        lock = .allocate(capacity: 1)
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        let kind = preferWriters ? PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP : PTHREAD_RWLOCK_PREFER_READER_NP
        pthread_rwlockattr_setkind_np(&attributes, Int32(kind))
        // SAFETY: freshly allocated, initialized once here, destroyed in deinit.
        pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Runs `body` while holding the lock shared with other readers.
    public func shared<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Runs `body` while holding the lock alone.
    public func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}

/// A mutex with a condition variable, for a dedicated thread that sleeps
/// until another thread hands it work or asks it to stop. Only blocking
/// threads wait on it; tasks never do.
public final class ConditionLock<Protected>: @unchecked Sendable {
    // `@unchecked Sendable` invariant: `protected` is touched only with the mutex held; the pthread objects never move.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var protected: Protected

    public init(_ initial: Protected) {
        protected = initial
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        // SAFETY: freshly allocated, initialized once here, destroyed in deinit.
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        // Timed waits measure CLOCK_MONOTONIC, so a clock step cannot stretch them.
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    /// Runs `body` with the protected value, holding the lock.
    public func withLock<T>(_ body: (inout Protected) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&protected)
    }

    /// Runs `body` with the protected value and then wakes every waiter.
    public func withLockThenBroadcast<T>(_ body: (inout Protected) throws -> T) rethrows -> T {
        try withLock(thenWaking: pthread_cond_broadcast, body)
    }

    /// Runs `body` with the protected value and then wakes one waiter: for
    /// queues where any one of several identical workers may take the item.
    public func withLockThenSignal<T>(_ body: (inout Protected) throws -> T) rethrows -> T {
        try withLock(thenWaking: pthread_cond_signal, body)
    }

    private func withLock<T>(thenWaking wake: (UnsafeMutablePointer<pthread_cond_t>) -> Int32,
                             _ body: (inout Protected) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer {
            _ = wake(condition)
            pthread_mutex_unlock(mutex)
        }
        return try body(&protected)
    }

    /// Waits, holding the lock between checks, until `ready` is true of the
    /// protected value, then runs `body` with it. With a `timeout`, returns
    /// nil when it passes first.
    public func wait<T>(until ready: (Protected) -> Bool, timeout: Duration? = nil,
                        then body: (inout Protected) throws -> T) rethrows -> T? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var deadline = timespec()
        if let timeout {
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            let total = Int64(deadline.tv_nsec) + timeout.wholeNanoseconds
            deadline.tv_sec += Int(total / 1_000_000_000)
            deadline.tv_nsec = Int(total % 1_000_000_000)
        }
        while !ready(protected) {
            if timeout == nil {
                pthread_cond_wait(condition, mutex)
            } else if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT, !ready(protected) {
                return nil
            }
        }
        return try body(&protected)
    }
}
