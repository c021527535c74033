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
import FerryToolkit

/// A dedicated thread and its job queue, owning one image's `RegionFiles`.
///
/// Threading: `files` lives on the worker thread alone (captured by it, never
/// stored here); the queue is shared under a `ConditionLock`, on which the
/// worker sleeps for jobs and `submit` for space. `submit` and `stop` are the
/// owner's (ImageWriter's) calls.
final class ImageWorker {
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

    private struct Queue {
        var jobs: [Job] = []
        var queuedBytes = 0
        var failure: (any Error)? = nil
        var stopping = false
        var stats = ImageWriterStatistics()
    }
    private let queue = ConditionLock(Queue())
    private var thread: DedicatedThread? = nil

    /// Starts the thread. `name` says whose image it writes, for errors.
    init(files: RegionFiles, name: String) throws {
        let queue = self.queue
        thread = try DedicatedThread(for: "the image writer of \(name)") { Self.loop(files, queue) }
    }

    /// Queues a job. Throws the first failure of an earlier job (a write
    /// error, a full disk), so the migration stops early.
    func submit(_ job: Job, bytes: Int) throws {
        // Back-pressure: blocks the caller only while the disk lags the link.
        try queue.wait(until: { q in
            q.failure != nil || q.stopping || q.queuedBytes == 0 || q.queuedBytes + bytes <= Self.maxQueuedBytes
        }) { q in
            if let failure = q.failure { throw failure }
            guard !q.stopping else { throw MigrationError.image("the image writer has stopped") }
        }
        queue.withLockThenBroadcast { q in
            q.jobs.append(job)
            q.queuedBytes += bytes
        }
    }

    var statistics: ImageWriterStatistics { queue.withLock { $0.stats } }

    /// Ends the thread after its current job; queued jobs are dropped (a
    /// waiting `finish` gets an error). Call once, from the owner.
    func stop() {
        queue.withLockThenBroadcast { $0.stopping = true }
        thread?.join()
        thread = nil
        let dropped = queue.withLock { q in
            defer { q.jobs.removeAll() }
            return q.jobs
        }
        for case .finish(_, _, let continuation) in dropped {
            continuation.resume(throwing: MigrationError.image("the image writer stopped before the image was complete"))
        }
    }

    private static func loop(_ files: RegionFiles, _ queue: ConditionLock<Queue>) {
        // Bulk work, like the bulk AEAD workers: it gives way to the threads
        // that carry the protocol and, on a host the seeder shares, to the
        // seeder's checksum, which the migration waits for.
        lowerCurrentThreadPriority(nice: Self.nice)
        var hashMore = false
        var failed: (any Error)? = nil
        while true {
            let more = hashMore
            let taken = queue.wait(until: { !$0.jobs.isEmpty || $0.stopping || more }) { q -> [Job]? in
                if q.stopping { return nil }
                defer { q.jobs.removeAll(keepingCapacity: true) }
                return q.jobs
            }
            guard let batch = taken ?? nil else { return }

            var bytes = 0
            for job in batch {
                if case .write(let range, _, _) = job { bytes += Int(range.length) }
                do {
                    try run(job, on: files, failed: failed)
                } catch {
                    failed = failed ?? error
                }
            }
            hashMore = false
            if failed == nil {
                do { hashMore = try files.hashStep() } catch { failed = error }
            }
            let stats = ImageWriterStatistics(bytesWritten: files.bytesWritten, bytesCopied: files.bytesCopied,
                                              pagesHashed: files.pagesHashed)
            queue.withLockThenBroadcast { q in
                q.queuedBytes -= bytes
                q.stats = stats
                if q.failure == nil, let failed { q.failure = failed }
            }
        }
    }

    private static func run(_ job: Job, on files: RegionFiles, failed: (any Error)?) throws {
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
