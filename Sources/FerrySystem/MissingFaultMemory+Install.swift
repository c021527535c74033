// Installing post-copy pages: UFFDIO_COPY and UFFDIO_ZEROPAGE per run of
// missing pages, huge pages staged until whole, and poisoning what cannot
// arrive. Everything here runs under the lock of `MissingFaultMemory.state`,
// which holds the bitmap that makes installing twice impossible (see
// MissingFaultMemory.swift).
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

extension MissingFaultMemory {
    /// Everything mutable about the memory, under `state`'s lock.
    struct State: Sendable {
        /// Installed (or poisoned) pages, one bit a page, per mapping.
        var bitmaps: [[UInt64]]
        var installedCount = 0
        /// Touched pages (source addresses; a huge page by its start) waiting
        /// for data, with the first touch's time.
        var pending: [UInt64: ContinuousClock.Instant] = [:]
        /// Huge pages partly arrived, by source address.
        var staged: [UInt64: HugeStage] = [:]
        var stats = Statistics()
        var failure: MissingFaultMemoryError?
        var onFault: (@Sendable (UInt64) -> Void)?
        var handler: pthread_t?
        var unmapped = false

        func bit(_ m: Int, _ i: Int) -> Bool { bitmaps[m][i >> 6] & (1 << UInt64(i & 63)) != 0 }

        mutating func setBits(_ m: Int, _ from: Int, _ count: Int) {
            for i in from..<from + count { bitmaps[m][i >> 6] |= 1 << UInt64(i & 63) }
            installedCount += count
        }
    }

    /// The 4 KiB pages of one huge page, gathered until the last arrives.
    /// Lives in `State.staged`; its memory is released by whoever removes it.
    struct HugeStage: Sendable {
        /// Where the `size` bytes of anonymous memory are (zero filled by the
        /// kernel), as a number so the stage is plain data.
        private let address: UInt
        var buffer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }
        let size: UInt64
        private var arrived: [UInt64]
        private(set) var count = 0

        init(size: UInt64, owner: String) throws {
            // SAFETY: a fresh private mapping, owned by this stage until `release`.
            let pointer = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard pointer != MAP_FAILED, let pointer else {
                throw SystemError(operation: "mmap \(size >> 10) KiB to stage a huge page", target: owner, errno: errno,
                                  hint: "not enough memory to gather a huge page before installing it")
            }
            address = UInt(bitPattern: pointer)
            self.size = size
            arrived = Array(repeating: 0, count: Int(size / FerrySystem.pageSize + 63) / 64)
        }

        var isComplete: Bool { count == Int(size / FerrySystem.pageSize) }

        /// Marks 4 KiB page `index` arrived; false when it had already.
        mutating func mark(_ index: Int) -> Bool {
            let bit: UInt64 = 1 << UInt64(index & 63)
            guard arrived[index >> 6] & bit == 0 else { return false }
            arrived[index >> 6] |= bit
            count += 1
            return true
        }

        func release() { munmap(buffer, Int(size)) }
    }

    // MARK: - Installing

    /// Installs whole pages at source range `range` (`data.count == range.length`).
    /// Pages already installed are skipped, never copied again; a page that
    /// was touched wakes its toucher. Pages outside every region are ignored.
    /// In hugetlb regions the pages are staged until their huge page is
    /// whole, then installed with it. Returns the number of pages newly
    /// installed (4 KiB pages).
    @discardableResult
    public func install(_ range: AddressRange, data: UnsafeRawBufferPointer) throws -> Int {
        precondition(UInt64(data.count) == range.length, "page data does not match its range")
        return try installRuns(range, data: data, count: \.pagesCopied) { local, offset, length, done in
            var copy = uffdio_copy(dst: local, src: UInt64(UInt(bitPattern: data.baseAddress!)) + offset,
                                   len: length, mode: 0, copy: 0)
            // SAFETY: `src` points into `data`, which holds `length` bytes from `offset`;
            // `dst` is inside a mapping we registered.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_copy(fd, &copy) }
            done = copy.copy > 0 ? UInt64(copy.copy) : 0
            return result < 0 ? errno : 0
        }
    }

    /// Installs all-zero pages at source range `range` with the zero page
    /// (staged as zeros in hugetlb regions, which have no zero page).
    @discardableResult
    public func installZero(_ range: AddressRange) throws -> Int {
        try installRuns(range, data: nil, count: \.pagesZeroed) { local, _, length, done in
            var zero = uffdio_zeropage(range: uffdio_range(start: local, len: length), mode: 0, zeropage: 0)
            // SAFETY: `local..<local+length` is inside a mapping we registered; the kernel only writes `zeropage`.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_zeropage(fd, &zero) }
            done = zero.zeropage > 0 ? UInt64(zero.zeropage) : 0
            return result < 0 ? errno : 0
        }
    }

    /// Runs `ioctl(local, offsetInRange, length, &bytesDone) -> errno` for each
    /// contiguous run of pages of `range` not installed yet, under the lock
    /// of `state`, and adds the pages installed to the counter `count`.
    /// EAGAIN (the map is changing) is retried from where it stopped; EEXIST
    /// (present already) marks the page and moves past it. Hugetlb regions
    /// take `data` (nil: zeros) into their huge pages' stages instead.
    private func installRuns(_ range: AddressRange, data: UnsafeRawBufferPointer?, count: WritableKeyPath<Statistics, Int>,
                             _ ioctl: (UInt64, UInt64, UInt64, inout UInt64) throws -> Int32) throws -> Int {
        try state.withLock { state in
            var installed = 0
            var address = range.start
            while address < range.end {
                guard let (m, first) = locateOrNext(address, limit: range.end) else { break }
                let mapping = mappings[m]
                let stop = min(range.end, mapping.source.end)
                if mapping.isHugetlb {
                    installed += try stagePages(m, from: max(address, mapping.source.start), to: stop,
                                                data: data.map { ($0, range.start) }, state: &state)
                    address = stop
                    continue
                }
                let pages = Int((stop - max(address, mapping.source.start)) / pageSize)
                var i = first
                while i < first + pages {
                    if state.bit(m, i) { state.stats.pagesAlreadyInstalled += 1; i += 1; continue }
                    var j = i
                    while j < first + pages && !state.bit(m, j) { j += 1 }
                    // Pages i..<j are missing: one ioctl for the run, or for
                    // runStart..<runEnd while a VMA boundary splits it.
                    var runStart = i
                    var runEnd = j
                    var attempts = 0
                    while runStart < j {
                        if runStart >= runEnd { runEnd = j }
                        let source = mapping.source.start + UInt64(runStart) * pageSize
                        let length = UInt64(runEnd - runStart) * pageSize
                        var done: UInt64 = 0
                        state.stats.installCalls += 1
                        let error = try ioctl(mapping.localAddress(of: source), source - range.start, length, &done)
                        let donePages = Int(done / pageSize)
                        if donePages > 0 {
                            state.setBits(m, runStart, donePages)
                            installed += donePages
                            state.stats[keyPath: count] += donePages
                            for page in 0..<donePages { state.pending[source + UInt64(page) * pageSize] = nil }
                            runStart += donePages
                        }
                        switch error {
                        case 0:
                            runStart = runEnd
                        case ENOENT where donePages == 0 && runEnd - runStart > 1:
                            // One ioctl stays inside one VMA, and the program
                            // may have split the mapping since (mprotect,
                            // madvise of some flags): halve down to the page;
                            // only a page's own ENOENT means it is unmapped.
                            runEnd = runStart + (runEnd - runStart) / 2
                        case EAGAIN:
                            try pauseWhileBusy(&attempts, "UFFDIO_COPY", at: source)
                        case EEXIST:
                            // Present without us: keep it, never overwrite; wake anyone waiting on it.
                            let page = mapping.source.start + UInt64(runStart) * pageSize
                            state.stats.kernelAlreadyPresent += 1
                            state.setBits(m, runStart, 1)
                            state.pending[page] = nil
                            let local = mapping.localAddress(of: page)
                            try? uffd.wake(AddressRange(start: local, end: local + pageSize))
                            runStart += 1
                        default:
                            throw SystemError(operation: "installing pages", target: "\(owner) at 0x\(String(source, radix: 16)) "
                                              + "(local 0x\(String(mapping.localAddress(of: source), radix: 16)))", errno: error,
                                              hint: error == ENOENT ? "the region was unmapped by its program" : nil)
                        }
                    }
                    i = j
                }
                address = stop
            }
            return installed
        }
    }

    /// Stages the 4 KiB pages `from..<to` of hugetlb mapping `m` (`data`
    /// holds them at offset `page - dataStart`; nil: zeros) and installs
    /// each huge page whose pages are all there. The caller holds the lock
    /// of `state`. Returns the 4 KiB pages newly installed.
    private func stagePages(_ m: Int, from: UInt64, to: UInt64,
                            data: (bytes: UnsafeRawBufferPointer, start: UInt64)?, state: inout State) throws -> Int {
        let mapping = mappings[m]
        let size = mapping.pageSize
        var installed = 0
        var page = from
        while page < to {
            let huge = page & ~(size - 1)
            let end = min(to, huge + size)
            defer { page = end }
            if state.bit(m, Int((huge - mapping.source.start) / pageSize)) {
                state.stats.pagesAlreadyInstalled += Int((end - page) / pageSize)
                continue
            }
            // Taken out while it changes, so its bitmap is not copied on write.
            var stage = try state.staged.removeValue(forKey: huge) ?? HugeStage(size: size, owner: owner)
            // Every copy of a page after Finalize holds the same bytes (the
            // frozen source's), so a page staged again is simply written again.
            // SAFETY: `page..<end` lies inside this huge page's buffer, and
            // inside `data` (the caller's range covers it).
            if let data {
                memcpy(stage.buffer + Int(page - huge), data.bytes.baseAddress! + Int(page - data.start), Int(end - page))
            } else {
                memset(stage.buffer + Int(page - huge), 0, Int(end - page))
            }
            var index = Int((page - huge) / pageSize)
            for _ in 0..<Int((end - page) / pageSize) {
                if !stage.mark(index) { state.stats.pagesAlreadyInstalled += 1 }
                index += 1
            }
            guard stage.isComplete else {
                state.staged[huge] = stage
                continue
            }
            defer { stage.release() }
            installed += try copyHuge(m, huge, from: stage.buffer, state: &state)
        }
        return installed
    }

    /// Installs the huge page at source address `huge` of mapping `m` with
    /// one UFFDIO_COPY from `buffer` (its whole size). The caller holds the lock of `state`.
    private func copyHuge(_ m: Int, _ huge: UInt64, from buffer: UnsafeMutableRawPointer, state: inout State) throws -> Int {
        let mapping = mappings[m]
        let local = mapping.localAddress(of: huge)
        let pages = Int(mapping.pageSize / pageSize)
        let first = Int((huge - mapping.source.start) / pageSize)
        var attempts = 0
        while true {
            var copy = uffdio_copy(dst: local, src: UInt64(UInt(bitPattern: buffer)), len: mapping.pageSize, mode: 0, copy: 0)
            state.stats.installCalls += 1
            // SAFETY: `src` is a stage of `len` bytes; `dst` a whole huge page of a mapping we registered.
            let result = try uffd.withDescriptor { fd in ferry_uffdio_copy(fd, &copy) }
            let error = result < 0 ? errno : 0
            if error == 0 || copy.copy == Int64(mapping.pageSize) {
                state.setBits(m, first, pages)
                state.stats.pagesCopied += pages
                state.stats.hugePagesCopied += 1
                state.pending[huge] = nil
                return pages
            }
            switch error {
            case EAGAIN:
                try pauseWhileBusy(&attempts, "UFFDIO_COPY of a huge page", at: huge)
            case EEXIST:
                // Present without us: keep it, never overwrite; wake anyone waiting on it.
                state.stats.kernelAlreadyPresent += 1
                state.setBits(m, first, pages)
                state.pending[huge] = nil
                try? uffd.wake(AddressRange(start: local, end: local + mapping.pageSize))
                return 0
            default:
                let kib = mapping.pageSize >> 10
                throw SystemError(operation: "installing a huge page of \(kib) KiB",
                                  target: "\(owner) at 0x\(String(huge, radix: 16)) (local 0x\(String(local, radix: 16)))",
                                  errno: error,
                                  hint: error == ENOENT ? "the region was unmapped by its program"
                                      : error == ENOMEM ? "no free huge page of \(kib) KiB in the pool "
                                                          + "(/sys/kernel/mm/hugepages/hugepages-\(kib)kB/nr_hugepages)" : nil)
            }
        }
    }

    /// After EAGAIN (the target's memory map is changing): a yield for the
    /// first 10 attempts, then 100 µs sleeps, and an error past
    /// `Userfaultfd.busyRetries` that names `operation` and the page.
    private func pauseWhileBusy(_ attempts: inout Int, _ operation: String, at source: UInt64) throws {
        attempts += 1
        if attempts > Userfaultfd.busyRetries {
            throw SystemError(operation: operation, target: "\(owner) at 0x\(String(source, radix: 16))",
                              errno: EAGAIN, hint: "the memory map kept changing")
        }
        usleep(attempts < 10 ? 0 : 100)
    }

    private func locateOrNext(_ address: UInt64, limit: UInt64) -> (Int, Int)? {
        var low = 0, high = mappings.count
        while low < high {
            let mid = (low + high) / 2
            if mappings[mid].source.end <= address { low = mid + 1 } else { high = mid }
        }
        guard low < mappings.count, mappings[low].source.start < limit else { return nil }
        let start = max(address, mappings[low].source.start)
        return (low, Int((start - mappings[low].source.start) / pageSize))
    }

    /// Marks pages of `range` (source addresses) that nothing backs in the
    /// source (past the end of its file): they raise SIGBUS when touched, as
    /// they did there. Returns how many were marked.
    @discardableResult
    public func installHole(_ range: AddressRange) -> Int {
        state.withLock { state in poison(range, state: &state) }
    }

    /// Poisons the missing pages of `range` (source addresses): each then
    /// raises SIGBUS when touched, and blocked touchers are woken to get it.
    /// The caller holds the lock of `state`.
    func poison(_ range: AddressRange, state: inout State) -> Int {
        var poisoned = 0
        var address = range.start
        while address < range.end, let (m, _) = locateOrNext(address, limit: range.end) {
            let mapping = mappings[m]
            let stop = min(range.end, mapping.source.end)
            // In units of the mapping's pages: hugetlb memory is poisoned in whole huge pages.
            let unit = mapping.pageSize
            let from = max(address, mapping.source.start) & ~(unit - 1)
            let first = Int((from - mapping.source.start) / pageSize)
            let pages = Int(((stop + unit - 1) & ~(unit - 1)) - from) / Int(pageSize)
            let step = Int(unit / pageSize)
            for i in stride(from: first, to: first + pages, by: step) where !state.bit(m, i) {
                let source = mapping.source.start + UInt64(i) * pageSize
                let local = mapping.localAddress(of: source)
                var request = uffdio_poison(range: uffdio_range(start: local, len: unit), mode: 0, updated: 0)
                var attempts = 0
                while true {
                    // SAFETY: one page of the mapping's size inside a mapping we registered; the kernel only writes `updated`.
                    let result = (try? uffd.withDescriptor { fd in ferry_uffdio_poison(fd, &request) }) ?? -1
                    if result == 0 || errno == EEXIST { break }
                    attempts += 1
                    if errno != EAGAIN || attempts > 1000 { break }
                    usleep(100)
                }
                state.setBits(m, i, step)
                state.pending[source] = nil
                state.staged.removeValue(forKey: source)?.release()
                poisoned += step
            }
            address = stop
        }
        state.stats.pagesPoisoned += poisoned
        return poisoned
    }
}
