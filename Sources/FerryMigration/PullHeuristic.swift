// Pull heuristics decide the order in which the leecher asks for pages.
// The order matters twice: pages pulled early and never written again are
// the ones that shrink the final dirty set, and after Finalize, pages the
// consumer touches first should arrive first.
import Foundation

/// Chooses the order of the pages still to pull. Called at the start of each
/// round with the current store; returns ranges of pages that are remote or
/// dirty, most wanted first. Pages left out are pulled last, in address order.
public protocol PullHeuristic: Sendable {
    var name: String { get }
    func order(_ store: PageStore, layout: [Region]) -> [AddressRange]
}

/// The names accepted by `--heuristic`.
public enum HeuristicName {
    public static let all = ["sequential", "stack-heap-first", "cold-first", "profile FILE"]

    /// Parses `sequential`, `stack-heap-first`, `cold-first` or `profile:FILE` / `profile FILE`.
    public static func make(_ text: String) throws -> any PullHeuristic {
        switch text {
        case "sequential": return SequentialHeuristic()
        case "stack-heap-first": return StackHeapFirstHeuristic()
        case "cold-first": return ColdFirstHeuristic()
        default:
            for prefix in ["profile:", "profile ", "profile="] where text.hasPrefix(prefix) {
                return try ProfileHeuristic(path: String(text.dropFirst(prefix.count)))
            }
            throw MigrationError.badArgument(
                "unknown heuristic '\(text)': choose sequential, stack-heap-first, cold-first or profile:FILE")
        }
    }
}

private let wanted: Set<PageState> = [.remote, .dirty]

/// Address order: the simplest, and the kindest to readahead-like access.
public struct SequentialHeuristic: PullHeuristic {
    public init() {}
    public var name: String { "sequential" }
    public func order(_ store: PageStore, layout: [Region]) -> [AddressRange] {
        store.ranges(in: wanted)
    }
}

/// Stacks and the heap first (what a resumed program touches at once), then
/// other anonymous memory, then file-backed data.
public struct StackHeapFirstHeuristic: PullHeuristic {
    public init() {}
    public var name: String { "stack-heap-first" }

    static func rank(_ region: Region) -> Int {
        if region.name.hasPrefix("[stack") { return 0 }
        if region.name == "[heap]" { return 1 }
        if region.name.isEmpty || region.name.hasPrefix("[anon") { return 2 }
        return 3
    }

    public func order(_ store: PageStore, layout: [Region]) -> [AddressRange] {
        let all = store.ranges(in: wanted)
        let ranked = layout.filter { $0.kind == .migrate }.sorted {
            (Self.rank($0), $0.start) < (Self.rank($1), $1.start)
        }
        var out: [AddressRange] = []
        for region in ranked {
            for range in all where range.start < region.end && region.start < range.end {
                out.append(AddressRange(start: max(range.start, region.start), end: min(range.end, region.end)))
            }
        }
        return out
    }
}

/// Pages the seeder has reported dirty least often first: hot pages are
/// likely to be written again, so pulling them early is wasted work.
public struct ColdFirstHeuristic: PullHeuristic {
    public init() {}
    public var name: String { "cold-first" }
    public func order(_ store: PageStore, layout: [Region]) -> [AddressRange] {
        var byHeat: [Int: [AddressRange]] = [:]
        for range in store.ranges(in: wanted) {
            var runStart = range.start
            var runHeat = store.dirtyReportCount(at: range.start)
            var address = range.start + pageSize
            while address < range.end {
                let heat = store.dirtyReportCount(at: address)
                if heat != runHeat {
                    byHeat[runHeat, default: []].append(AddressRange(start: runStart, end: address))
                    runStart = address
                    runHeat = heat
                }
                address += pageSize
            }
            byHeat[runHeat, default: []].append(AddressRange(start: runStart, end: range.end))
        }
        return byHeat.keys.sorted().flatMap { byHeat[$0]! }
    }
}

/// An access order recorded from an earlier run: one page address per line
/// (hexadecimal with `0x`, or decimal), or `START-END` ranges; `#` comments.
/// Pages of the profile come first, in its order; the rest follow in address order.
public struct ProfileHeuristic: PullHeuristic {
    public let path: String
    public let pages: [UInt64]
    public var name: String { "profile:\(path)" }

    public init(path: String) throws {
        self.path = path
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw MigrationError.badArgument("cannot read profile file \(path): check the path and its permissions")
        }
        var pages: [UInt64] = []
        for (number, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)[0]
                .trimmingCharacters(in: .whitespaces)
            if line.isEmpty { continue }
            let parts = line.split(separator: "-")
            guard (1...2).contains(parts.count),
                  let first = Self.parseAddress(parts[0]),
                  let last = parts.count == 2 ? Self.parseAddress(parts[1]) : first + pageSize,
                  first < last
            else {
                throw MigrationError.badArgument(
                    "profile file \(path), line \(number + 1): expected an address or START-END, found '\(line)'")
            }
            var page = first & ~(pageSize - 1)
            while page < last {
                pages.append(page)
                page += pageSize
            }
        }
        self.pages = pages
    }

    static func parseAddress(_ text: Substring) -> UInt64? {
        let t = text.trimmingCharacters(in: .whitespaces)
        if t.hasPrefix("0x") || t.hasPrefix("0X") { return UInt64(t.dropFirst(2), radix: 16) }
        return UInt64(t)
    }

    public func order(_ store: PageStore, layout: [Region]) -> [AddressRange] {
        var out: [AddressRange] = []
        for page in pages {
            guard let state = store.state(at: page), wanted.contains(state) else { continue }
            if let last = out.last, last.end == page {
                out[out.count - 1].end = page + pageSize
            } else {
                out.append(AddressRange(start: page, end: page + pageSize))
            }
        }
        return out + store.ranges(in: wanted)  // duplicates are skipped by the puller
    }
}
