// The seeder's ReadAt: the requested pages in parts of at most 1 MiB (2 MiB
// with whole huge pages), each re-armed, read and marked sent under
// `reading` shared, so no scan can fall between re-arming a page and
// marking it sent, while reads of several requests run at once.
import FerryToolkit

extension SeederService {
    /// One part read and encoded, and how many of its pages were sent before.
    private struct ReadPart: Sendable {
        var bytes: [UInt8]
        var resent: Int
    }

    /// Answers ReadAt; `huge` are the hugetlb regions it touches whose huge
    /// pages a part holds whole (ascending). `urgent`: a post-copy touch.
    func readAt(_ request: ReadRequest, huge: [Region], _ parts: RPCPartWriter, urgent: Bool) async throws {
        // A huge page asked for whole is never split across parts: only a
        // huge page read whole is re-armed.
        let capacity = huge.isEmpty ? MigrationLimits.pagesPerPart : MigrationLimits.hugePagesPerPart
        var batch: [AddressRange] = []
        var batchPages = 0
        func flush() async throws {
            guard !batch.isEmpty else { return }
            let (ranges, pages) = (batch, batchPages)
            // Bulk parts are read (process_vm_readv of a megabyte) on a thread
            // of their own; a touch's few pages are read at once, as a thread
            // would cost it more than the read.
            let part = urgent ? try readPart(ranges, pages: pages)
                : try await runOnDedicatedThread(for: "the pages of pid \(source.pid)") { [self] in
                    _ = bulkReads.wait(until: { $0 < Self.bulkReadLimit }) { $0 += 1 }
                    defer { bulkReads.withLockThenSignal { $0 -= 1 } }
                    return try readPart(ranges, pages: pages)
                }
            metrics.sent(pages: pages, bytes: part.bytes.count, resent: part.resent)
            batch.removeAll(keepingCapacity: true)
            batchPages = 0
            // The cap (no lock is held here): bulk waits, a touch only charges.
            if let pacer = options.pacer {
                if urgent { pacer.charge(part.bytes.count) } else { try await pacer.pace(part.bytes.count) }
            }
            try await parts.send(part.bytes)
        }
        for range in request.ranges {
            var start = range.start
            while start < range.end {
                if let index = Ranges.index(in: huge, containing: start, range: \.range) {
                    let size = huge[index].pageSize
                    if start % size == 0 && start + size <= range.end {
                        // A whole huge page: one unit, in this part if it fits, else in the next.
                        let unit = Int(size / pageSize)
                        if batchPages + unit > capacity { try await flush() }
                        batch.append(AddressRange(start: start, end: start + size))
                        batchPages += unit
                        start += size
                        if batchPages >= MigrationLimits.pagesPerPart { try await flush() }
                        continue
                    }
                }
                let room = max(0, MigrationLimits.pagesPerPart - batchPages)
                // Ordinary pages stop at the next huge page, which is taken whole above.
                var stop = range.end
                let nextIndex = Ranges.firstIndex(in: huge, endingAfter: start, end: \.end)
                if nextIndex < huge.endIndex, huge[nextIndex].start < range.end {
                    let next = huge[nextIndex]
                    let boundary = next.start > start ? next.start : (start + next.pageSize - 1) & ~(next.pageSize - 1)
                    if boundary > start && boundary < stop { stop = boundary }
                }
                let take = min(UInt64(room), (stop - start) / pageSize)
                batch.append(AddressRange(start: start, end: start + take * pageSize))
                batchPages += Int(take)
                start += take * pageSize
                if batchPages >= MigrationLimits.pagesPerPart { try await flush() }
            }
        }
        try await flush()
    }

    /// Re-arms, reads and marks sent the `pages` pages of `batch`, and
    /// encodes them as one part. Blocks: in `process_vm_readv`, and on
    /// `reading` while a scan holds it.
    private func readPart(_ batch: [AddressRange], pages: Int) throws -> ReadPart {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * Int(pageSize), alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var resent = 0
        let (vanished, holes) = try reading.shared {
            // Only memory of the migration is read: pages outside the
            // current layout's migratable regions (code, [vdso], anything
            // unmapped since) are answered as unmapped, never read.
            let migrated = state.withLock { $0.migrated }
            let outside = Ranges.subtract(Ranges.merge(batch), migrated)
            let unreadable = outside.isEmpty ? try source.readPages(batch, into: buffer)
                                             : try readInside(batch, migrated, into: buffer)
            let holes = try unbacked(unreadable)
            let fresh = state.withLock { s -> Int in
                // Pages never sent are remote in the seeder's store; the others were sent before.
                let remote = s.store.count(.remote)
                s.store.markSent(batch)
                s.pagesSent += UInt64(pages)
                return remote - s.store.count(.remote)
            }
            resent = pages - fresh
            return (unreadable + outside, holes)
        }
        let part = PagePart.build(ranges: batch, data: UnsafeRawBufferPointer(buffer), unmapped: vanished, holes: holes)
        return ReadPart(bytes: part, resent: resent)
    }

    /// The parts of `unreadable` that are still mapped as migratable memory:
    /// pages nothing backs (past the end of a file or shared memory object),
    /// where the process itself would get SIGBUS. The rest went away.
    func unbacked(_ unreadable: [AddressRange]) throws -> [AddressRange] {
        guard !unreadable.isEmpty else { return [] }
        let mapped = Ranges.merge(try ProcessMaps.read(pid: source.pid).filter { $0.kind == .migrate }.map(\.range))
        return Ranges.intersect(Ranges.merge(unreadable), mapped)
    }

    /// Reads the parts of `batch` inside `migrated` to their places in
    /// `buffer`; returns what vanished among them.
    private func readInside(_ batch: [AddressRange], _ migrated: [AddressRange],
                            into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        var vanished: [AddressRange] = []
        var offset = 0
        for range in batch {
            for piece in Ranges.intersect([range], migrated) {
                let at = offset + Int(piece.start - range.start)
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<(at + Int(piece.length))])
                vanished += try source.readPages([piece], into: view)
            }
            offset += Int(range.length)
        }
        return vanished
    }
}
