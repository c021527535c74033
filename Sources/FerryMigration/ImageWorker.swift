// The image writer's thread: writes pages into region files, reshapes them
// when the layout changes, and hashes final pages between jobs, so that
// none of this file I/O and BLAKE2b work (about 1.2 s a GiB on one core
// here) runs on the Swift cooperative pool, where it would hold up the
// replies the leecher is waiting for.
//
// Jobs run in the order they were submitted, which is the order the
// leecher saw pages and layouts. Between batches of jobs the thread hashes
// one step (1 MiB) of whatever region can advance, so queued writes never
// wait long behind hashing. The queue holds at most `maxQueuedBytes` of
// page data: past that, `submit` waits (the disk is slower than the link,
// and the transfer has to slow down to it anyway).
import Foundation
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// A dedicated thread and its job queue, owning one image's `RegionFiles`.
///
/// `@unchecked Sendable` invariant: `jobs`, `queuedBytes`, `failure`,
/// `stopping` and `stats` are only touched while holding `mutex`; `files`
/// only on the worker thread (from its start to its join in `stop`);
/// `thread` only by the owner (init and `stop`).
final class ImageWorker: @unchecked Sendable {
    enum Job {
        /// Pages `part[offset ..< offset + range.length]`.
        case write(AddressRange, [UInt8], Int)
        case zero(AddressRange)
        case adopt([Region])
        case frozen([Region], [AddressRange])
        /// Completes the files for the final layout, then calls the closure
        /// (on the worker thread) to write the manifest.
        case finish([Region], @Sendable ([ManifestRegion]) throws -> Manifest, CheckedContinuation<Manifest, any Error>)
    }

    /// Page data queued and not yet written, at most: 64 MiB is about 0.1 s
    /// of transfer here, enough to ride out a slow write without holding
    /// much memory.
    static let maxQueuedBytes = 64 << 20

    /// The thread's nice increment: that of the bulk AEAD workers (BulkWorkers).
    static let nice: Int32 = 10

    private let files: RegionFiles
    private var jobs: [Job] = []
    private var queuedBytes = 0
    private var failure: (any Error)? = nil
    private var stopping = false
    private var stats = ImageWriterStatistics()
    // SAFETY: initialised in init, destroyed in deinit, which runs only after
    // the thread was joined (the thread holds `self` until it ends).
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let work: UnsafeMutablePointer<pthread_cond_t>
    private let space: UnsafeMutablePointer<pthread_cond_t>
    private var thread: DedicatedThread? = nil

    /// Starts the thread. `name` says whose image it writes, for errors.
    init(files: RegionFiles, name: String) throws {
        self.files = files
        mutex = .allocate(capacity: 1)
        work = .allocate(capacity: 1)
        space = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(work, nil)
        pthread_cond_init(space, nil)
        thread = try DedicatedThread(for: "the image writer of \(name)") { [self] in loop() }
    }

    deinit {
        pthread_cond_destroy(space)
        pthread_cond_destroy(work)
        pthread_mutex_destroy(mutex)
        space.deallocate()
        work.deallocate()
        mutex.deallocate()
    }

    /// Queues a job. Throws the first failure of an earlier job (a write
    /// error, a full disk), so the migration stops early.
    func submit(_ job: Job, bytes: Int) throws {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        // Back-pressure: blocks the caller only while the disk lags the link.
        while failure == nil, !stopping, queuedBytes > 0, queuedBytes + bytes > Self.maxQueuedBytes {
            pthread_cond_wait(space, mutex)
        }
        if let failure { throw failure }
        guard !stopping else { throw MigrationError.image("the image writer has stopped") }
        jobs.append(job)
        queuedBytes += bytes
        pthread_cond_signal(work)
    }

    var statistics: ImageWriterStatistics {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return stats
    }

    /// Ends the thread after its current job; queued jobs are dropped (a
    /// waiting `finish` gets an error). Call once, from the owner.
    func stop() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(work)
        pthread_cond_broadcast(space)
        pthread_mutex_unlock(mutex)
        thread?.join()
        thread = nil
        pthread_mutex_lock(mutex)
        let dropped = jobs
        jobs.removeAll()
        pthread_mutex_unlock(mutex)
        for case .finish(_, _, let continuation) in dropped {
            continuation.resume(throwing: MigrationError.image("the image writer stopped before the image was complete"))
        }
    }

    private func loop() {
        // Bulk work, like the bulk AEAD workers: it gives way to the threads
        // that carry the protocol and, on a host the seeder shares, to the
        // seeder's checksum, which the migration waits for.
        lowerCurrentThreadPriority(nice: Self.nice)
        var hashMore = false
        var failed: (any Error)? = nil
        while true {
            pthread_mutex_lock(mutex)
            while jobs.isEmpty && !stopping && !hashMore { pthread_cond_wait(work, mutex) }
            if stopping {
                pthread_mutex_unlock(mutex)
                return
            }
            let batch = jobs
            jobs.removeAll(keepingCapacity: true)
            pthread_mutex_unlock(mutex)

            var bytes = 0
            for job in batch {
                if case .write(let range, _, _) = job { bytes += Int(range.length) }
                do {
                    try run(job, failed: failed)
                } catch {
                    failed = failed ?? error
                }
            }
            hashMore = false
            if failed == nil {
                do { hashMore = try files.hashStep() } catch { failed = error }
            }
            pthread_mutex_lock(mutex)
            queuedBytes -= bytes
            stats = ImageWriterStatistics(bytesWritten: files.bytesWritten, bytesCopied: files.bytesCopied,
                                          pagesHashed: files.pagesHashed)
            if failure == nil, let failed { failure = failed }
            pthread_cond_broadcast(space)
            pthread_mutex_unlock(mutex)
        }
    }

    private func run(_ job: Job, failed: (any Error)?) throws {
        switch job {
        case .finish(let layout, let writeManifest, let continuation):
            if let failed {
                continuation.resume(throwing: failed)
                return
            }
            do {
                let entries = try files.finish(layout: layout)
                continuation.resume(returning: try writeManifest(entries))
            } catch {
                continuation.resume(throwing: error)
                throw error
            }
        case _ where failed != nil:
            return
        case .write(let range, let part, let offset):
            try part.withUnsafeBytes { bytes in
                try files.write(range, UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(range.length)]))
            }
        case .zero(let range):
            try files.writeZero(range)
        case .adopt(let layout):
            try files.adopt(layout)
        case .frozen(let layout, let clean):
            try files.sourceFrozen(layout: layout, clean: clean)
        }
    }
}

/// What an image writer's thread has done so far: how "written once" and
/// "hashed while post-copy runs" are checked.
struct ImageWriterStatistics: Sendable, Equatable {
    /// Page data written to region files.
    var bytesWritten: UInt64 = 0
    /// Bytes copied between region files by layout changes.
    var bytesCopied: UInt64 = 0
    /// Pages hashed, counting those hashed again after a restart.
    var pagesHashed = 0
}
