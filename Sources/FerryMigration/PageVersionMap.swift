// The version of each page a hub has sent one leecher, kept compact: a hub
// holds one of these per leecher, so with N leechers of a 1 GiB process a
// dictionary entry per page (about 40 bytes with its hashing slack) cost
// N x 10 MiB; here it is 4 bytes per page of the 2 MiB chunks ever sent,
// N x 1 MiB.

/// Page address -> version sent, for pages sent at least once.
struct PageVersionMap: Sendable {
    /// Pages per chunk: 2 MiB of 4 KiB pages.
    static let chunkPages = 512
    /// Per chunk (address / 2 MiB), version + 1 of each page; 0: never sent.
    private var chunks: [UInt64: [UInt32]] = [:]
    private(set) var count = 0

    private static func locate(_ page: UInt64) -> (chunk: UInt64, index: Int) {
        let number = page / pageSize
        return (number / UInt64(chunkPages), Int(number % UInt64(chunkPages)))
    }

    subscript(page: UInt64) -> UInt32? {
        get {
            let (chunk, index) = Self.locate(page)
            guard let stored = chunks[chunk]?[index], stored != 0 else { return nil }
            return stored &- 1
        }
        set {
            let (chunk, index) = Self.locate(page)
            // UInt32.max (never reached: one increment per dirty report)
            // reads back one lower, so the page would only count dirty.
            let value = newValue.map { $0 == .max ? .max : $0 + 1 } ?? 0
            let old = chunks[chunk]?[index] ?? 0
            // Forgetting a page of a chunk never sent allocates nothing.
            guard value != 0 || chunks[chunk] != nil else { return }
            chunks[chunk, default: [UInt32](repeating: 0, count: Self.chunkPages)][index] = value
            count += (old == 0 ? 1 : 0) - (value == 0 ? 1 : 0)
        }
    }
}
