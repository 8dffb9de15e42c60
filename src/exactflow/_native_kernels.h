/* The compiled passes in one precision.
 *
 * _native.c includes this file twice: with REAL float, VL 8 and SUFFIX _f32, then with REAL
 * double, VL 4 and SUFFIX _f64. VEC is a vector of VL reals, 32 bytes, which GCC maps to the
 * widest registers of each target of CLONES.
 *
 * Notation: n rows, d coordinates, h hidden units. Rows are stored row-major: x[i * d + c].
 * A coupling keeps the coordinates c with c % 2 == parity (nk of them) and transforms the others
 * (nf of them); net 0 is the scale net, net 1 the shift net.
 */

#define FN(name) CAT(name, SUFFIX)
#define NR (2 * VL)

typedef REAL FN(vec) __attribute__((vector_size(32)));
typedef INTEGER FN(mask) __attribute__((vector_size(32)));
#define VEC FN(vec)
#define MASK FN(mask)

static inline __attribute__((always_inline)) VEC FN(load)(const REAL *p)
{
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* log(1 + x) to within a few units in the last place, by the fast log: with u = 1 + x rounded,
 * log(u) x / (u - 1) corrects the rounding of u (Goldberg 1991, "What every computer scientist
 * should know about floating-point arithmetic", theorem 4). */
static inline REAL FN(log1p)(REAL x)
{
    REAL u = 1 + x;
    return u == 1 ? x : x * (R_LOG(u) / (u - 1));
}

/* Lane by lane: where keep, value; elsewhere value * slope. */
static inline __attribute__((always_inline)) VEC FN(leaky)(VEC value, MASK keep, REAL slope)
{
    return (VEC)(((MASK)value & keep) | ((MASK)(value * slope) & ~keep));
}

/* The sum of a[k] * b[k]: VL partial sums, added lane to lane in a tree, then the tail. */
static inline __attribute__((always_inline)) REAL FN(dot)(const REAL *a, const REAL *b, int64_t n)
{
    VEC acc0 = {0}, acc1 = {0};
    int64_t k = 0;
    for (; k + NR <= n; k += NR) {
        acc0 += FN(load)(a + k) * FN(load)(b + k);
        acc1 += FN(load)(a + k + VL) * FN(load)(b + k + VL);
    }
    for (; k + VL <= n; k += VL)
        acc0 += FN(load)(a + k) * FN(load)(b + k);
    acc0 += acc1;
    REAL lanes[VL];
    memcpy(lanes, &acc0, sizeof acc0);
    for (int width = VL / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++)
            lanes[l] += lanes[l + width];
    REAL sum = lanes[0];
    for (; k < n; k++)
        sum += a[k] * b[k];
    return sum;
}

/* One tile of C = epilogue(A B): mr rows (at most MR) by NR columns, the whole of K. */
static inline __attribute__((always_inline)) void FN(tile)(
    int mode, int mr, int64_t K, const REAL *A, int64_t ars, int64_t aks, const REAL *B,
    int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope, const REAL *gate)
{
    VEC acc[MR][2];
    for (int r = 0; r < mr; r++)
        acc[r][0] = acc[r][1] = (VEC){0};
    for (int64_t k = 0; k < K; k++) {
        VEC b0 = FN(load)(B + k * ldb), b1 = FN(load)(B + k * ldb + VL);
        for (int r = 0; r < mr; r++) {
            REAL a = A[r * ars + k * aks];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }

    for (int r = 0; r < mr; r++) {
        for (int half = 0; half < 2; half++) {
            VEC v = acc[r][half];
            if (mode == BIAS_LEAKY) {
                v += FN(load)(bias + half * VL);
                v = FN(leaky)(v, v > 0, slope);
            } else if (mode == LEAKY_GRAD) {
                v = FN(leaky)(v, FN(load)(gate + r * ldc + half * VL) > 0, slope);
            }
            memcpy(C + r * ldc + half * VL, &v, sizeof v);
        }
    }
}

static inline __attribute__((always_inline)) void FN(tiles)(
    int mode, int mr, int64_t K, const REAL *A, int64_t ars, int64_t aks, const REAL *B,
    int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope, const REAL *gate)
{
    switch (mr) {
    case 6: FN(tile)(mode, 6, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 5: FN(tile)(mode, 5, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 4: FN(tile)(mode, 4, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 3: FN(tile)(mode, 3, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    case 2: FN(tile)(mode, 2, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    default: FN(tile)(mode, 1, K, A, ars, aks, B, ldb, C, ldc, bias, slope, gate); break;
    }
}

/* C (M × N, row stride ldc) = epilogue(A B), A read as A[i * ars + k * aks], B row-major.
 *
 * PLAIN stores the product; BIAS_LEAKY adds bias[j] and applies the leaky ReLU; LEAKY_GRAD
 * multiplies by the leaky ReLU's derivative read off gate, laid out like C.
 */
CLONES static void FN(gemm)(
    int mode, int64_t M, int64_t N, int64_t K, const REAL *A, int64_t ars, int64_t aks,
    const REAL *B, int64_t ldb, REAL *C, int64_t ldc, const REAL *bias, REAL slope,
    const REAL *gate)
{
    int64_t N0 = N - N % NR;
    for (int64_t j = 0; j < N0; j += NR) {
        for (int64_t i = 0; i < M; i += MR) {
            int mr = M - i < MR ? (int)(M - i) : MR;
            const REAL *a = A + i * ars;
            REAL *c = C + i * ldc + j;
            const REAL *g = gate ? gate + i * ldc + j : NULL;
            const REAL *bj = bias ? bias + j : NULL;
            if (mode == PLAIN)
                FN(tiles)(PLAIN, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
            else if (mode == BIAS_LEAKY)
                FN(tiles)(BIAS_LEAKY, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
            else
                FN(tiles)(LEAKY_GRAD, mr, K, a, ars, aks, B + j, ldb, c, ldc, bj, slope, g);
        }
    }

    /* The columns past the last whole tile, one at a time. */
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = N0; j < N; j++) {
            REAL sum = 0;
            for (int64_t k = 0; k < K; k++)
                sum += A[i * ars + k * aks] * B[k * ldb + j];
            if (mode == BIAS_LEAKY) {
                sum += bias[j];
                sum = sum > 0 ? sum : sum * slope;
            } else if (mode == LEAKY_GRAD) {
                sum = gate[i * ldc + j] > 0 ? sum : sum * slope;
            }
            C[i * ldc + j] = sum;
        }
    }
}

/* out (cols × rows) = the transpose of in (rows × cols, row stride ld). */
static void FN(transpose)(const REAL *in, int64_t rows, int64_t cols, int64_t ld, REAL *out)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            out[c * rows + r] = in[r * ld + c];
}

/* What the passes keep of one segment: its input rows and, per kind, what backward reads. */
typedef struct {
    REAL *x;
    REAL *h1[2], *h2[2];  /* coupling: hidden activations, n × h per net */
    REAL *s, *e;          /* coupling: tanh of the scale net's output and its exp, n × nf */
    REAL *w1k[2];         /* coupling: the first layer's kept columns, nk × h per net */
    REAL *w2t[2];         /* coupling: the second layer transposed, h × h per net */
    REAL *A[2], *B[2];    /* one kept coordinate: a2 = A[p] x + B[p] on piece p, see pieces */
    REAL *cuts[2];        /* one kept coordinate: the sorted breakpoints of the first layer */
    int32_t *rank[2];     /* one kept coordinate: each unit's place among the cuts, or -1 */
    int32_t *piece[2];    /* one kept coordinate: each row's piece, the cuts below it */
    int64_t cut_count[2];
    REAL *mean, *inv_std; /* batch norm: the statistics the map used, d each */
    REAL *tanh_a;         /* planar: tanh(w^T x + b), n */
    REAL *u_hat;          /* planar: the constrained u, d */
    REAL c, wu, ww, coef; /* planar: w^T u_hat, w^T u, w^T w, (softplus(wu) - 1 - wu) / ww */
} FN(Saved);

#define Saved FN(Saved)

/* Scratch of the backward passes, sized for the widest segment. */
typedef struct {
    REAL *g_out; /* coupling: gradients in both nets' outputs, 2 × n × nf */
    REAL *g_a2;  /* coupling: gradient in the second layer's pre-activation, n × h */
    REAL *g_a1;  /* coupling: gradient in the first layer's pre-activation, n × h */
    REAL *g_w1k; /* coupling: gradient in the first layer's kept columns, nk × h */
    double *sums; /* one kept coordinate: S and T of scalar_backward, 2 × (h + 2) × h */
    REAL *G, *Gx; /* one kept coordinate: one unit's gated sums, h each */
    double *g_u_hat, *g_weight; /* planar: gradients in u_hat and w, summed in double */
} FN(Scratch);

#define Scratch FN(Scratch)

/* A coupling with one kept coordinate x (every coupling in two dimensions) reads it through
 * h1 = leaky(w x + c), w and c the first layer's kept column and bias. Each unit k changes
 * slope where w_k x + c_k = 0, at the cut -c_k / w_k; between consecutive cuts every unit keeps
 * its slope, so the second layer's pre-activation a2 = W2 h1 + b2 is A[p] x + B[p] on piece p,
 * the piece above p of the sorted cuts. The tables A and B cost one pass over the h units,
 * after which a row costs O(h) instead of the O(h^2) of the product, forward and backward.
 *
 * Unit k is "on" (slope 1) on piece p when w_k > 0 and p > rank_k, or w_k < 0 and p <= rank_k;
 * a unit with w_k = 0 has no cut and is on everywhere when c_k > 0. A row exactly at a cut gets
 * the slope of the piece below, where w_k x + c_k is zero up to rounding and either slope
 * gives the same h1. */
typedef struct {
    REAL cut;
    int32_t unit;
} FN(Cut);

static int FN(by_cut)(const void *a, const void *b)
{
    REAL x = ((const FN(Cut) *)a)->cut, y = ((const FN(Cut) *)b)->cut;
    /* A NaN sorts last, so that the order stays total. */
    if (isnan(x) || isnan(y))
        return isnan(x) - isnan(y);
    return (x > y) - (x < y);
}

/* Whether unit k is on at piece p (see above), as 1 or the slope. */
static inline double FN(gate)(REAL w, REAL c, int32_t rank, int64_t p, double slope)
{
    int on = w > 0 ? p > rank : w < 0 ? p <= rank : c > 0;
    return on ? 1.0 : slope;
}

/* order, a and b: room for h cuts and 2 h doubles. */
CLONES static void FN(pieces)(
    const Record *rec, int net, REAL slope, Saved *sv, FN(Cut) *order, double *a, double *b)
{
    int64_t h = rec->hidden;
    const REAL *w = sv->w1k[net], *c = (const REAL *)rec->value[net * 6 + 1];
    const REAL *b2 = (const REAL *)rec->value[net * 6 + 3], *w2t = sv->w2t[net];
    int64_t m = 0;

    for (int64_t u = 0; u < h; u++) {
        sv->rank[net][u] = -1;
        if (w[u] != 0)
            order[m++] = (FN(Cut)){-c[u] / w[u], (int32_t)u};
    }
    qsort(order, (size_t)m, sizeof order[0], FN(by_cut));
    for (int64_t p = 0; p < m; p++) {
        sv->cuts[net][p] = order[p].cut;
        sv->rank[net][order[p].unit] = (int32_t)p;
    }
    sv->cut_count[net] = m;

    /* Piece 0, below every cut; then each cut turns one unit on or off. */
    for (int64_t o = 0; o < h; o++) {
        a[o] = 0;
        b[o] = b2[o];
    }
    for (int64_t u = 0; u < h; u++) {
        double g = FN(gate)(w[u], c[u], sv->rank[net][u], 0, slope);
        for (int64_t o = 0; o < h; o++) {
            a[o] += g * w[u] * w2t[u * h + o];
            b[o] += g * c[u] * w2t[u * h + o];
        }
    }
    for (int64_t p = 0; p <= m; p++) {
        if (p > 0) {
            int32_t u = order[p - 1].unit;
            double change = w[u] > 0 ? 1.0 - slope : slope - 1.0;
            for (int64_t o = 0; o < h; o++) {
                a[o] += change * w[u] * w2t[u * h + o];
                b[o] += change * c[u] * w2t[u * h + o];
            }
        }
        for (int64_t o = 0; o < h; o++) {
            sv->A[net][p * h + o] = (REAL)a[o];
            sv->B[net][p * h + o] = (REAL)b[o];
        }
    }
}

/* h2 = leaky(A[p] x + B[p]) for every row, p its piece. */
CLONES static void FN(scalar_hidden)(
    const Record *rec, int net, REAL slope, Saved *sv, const REAL *x, int64_t n)
{
    int64_t d = rec->dim, h = rec->hidden, m = sv->cut_count[net];
    const REAL *cuts = sv->cuts[net];

    for (int64_t i = 0; i < n; i++) {
        REAL xi = x[i * d + rec->parity];
        /* The number of cuts below xi, by a binary search without branches. */
        const REAL *base = cuts;
        int64_t left = m, p = 0;
        if (m > 0) {
            while (left > 1) {
                int64_t half = left / 2;
                base = base[half] < xi ? base + half : base;
                left -= half;
            }
            p = (base - cuts) + (*base < xi);
        }
        sv->piece[net][i] = (int32_t)p;
        const REAL *a = sv->A[net] + p * h, *b = sv->B[net] + p * h;
        REAL *row = sv->h2[net] + i * h;
        for (int64_t o = 0; o < h; o++) {
            REAL v = a[o] * xi + b[o];
            row[o] = v > 0 ? v : v * slope;
        }
    }
}

/* Given g_a2, the gradient in the second layer's pre-activation: write the gradients of W2, of
 * the first layer, and add the kept coordinate's share to g_x. With S[p] and T[p] the sums of
 * g_a2 and of g_a2 x over the rows of piece p, unit k sees G = sum of gate * S and
 * Gx = sum of gate * T over the pieces; then dW2[:, k] = w_k Gx + c_k G,
 * dw_k = W2[:, k] . Gx and dc_k = W2[:, k] . G, and each row's d x = g_a2 . A[p]. */
CLONES static void FN(scalar_backward)(
    const Record *rec, int net, REAL slope, const Saved *sv, const REAL *g_a2, REAL *g_x,
    int64_t n, const Scratch *scratch)
{
    int64_t d = rec->dim, h = rec->hidden, parity = rec->parity, m = sv->cut_count[net];
    const REAL *w = sv->w1k[net], *c = (const REAL *)rec->value[net * 6 + 1];
    const REAL *w2t = sv->w2t[net], *x = sv->x;
    REAL *gw1 = (REAL *)rec->grad[net * 6 + 0], *gb1 = (REAL *)rec->grad[net * 6 + 1];
    REAL *gw2 = (REAL *)rec->grad[net * 6 + 2];
    /* Row q of S and T holds the sums over the pieces below q, once accumulated. */
    double *S = scratch->sums, *T = scratch->sums + (m + 2) * h;
    REAL *G = scratch->G, *Gx = scratch->Gx;

    memset(S, 0, (size_t)(2 * (m + 2) * h) * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        int64_t p = sv->piece[net][i];
        REAL xi = x[i * d + parity];
        const REAL *g = g_a2 + i * h;
        double *s = S + (p + 1) * h, *t = T + (p + 1) * h;
        for (int64_t o = 0; o < h; o++) {
            s[o] += g[o];
            t[o] += (double)g[o] * xi;
        }
        g_x[i * d + parity] += FN(dot)(g, sv->A[net] + p * h, h);
    }
    for (int64_t q = 1; q <= m + 1; q++)
        for (int64_t o = 0; o < h; o++) {
            S[q * h + o] += S[(q - 1) * h + o];
            T[q * h + o] += T[(q - 1) * h + o];
        }

    const double *S_all = S + (m + 1) * h, *T_all = T + (m + 1) * h;
    memset(gw1, 0, (size_t)(h * d) * sizeof(REAL));
    for (int64_t u = 0; u < h; u++) {
        int32_t r = sv->rank[net][u];
        const double *S_low = S + (r + 1) * h, *T_low = T + (r + 1) * h;
        /* The slopes below and above the unit's cut: the pieces p <= r and p > r. */
        double low = w[u] > 0 ? slope : w[u] < 0 ? 1.0 : (c[u] > 0 ? 1.0 : slope);
        double high = w[u] > 0 ? 1.0 : w[u] < 0 ? slope : low;
        for (int64_t o = 0; o < h; o++) {
            G[o] = (REAL)(low * S_low[o] + high * (S_all[o] - S_low[o]));
            Gx[o] = (REAL)(low * T_low[o] + high * (T_all[o] - T_low[o]));
        }
        for (int64_t o = 0; o < h; o++)
            gw2[o * h + u] = w[u] * Gx[o] + c[u] * G[o];
        gw1[u * d + parity] = FN(dot)(w2t + u * h, Gx, h);
        gb1[u] = FN(dot)(w2t + u * h, G, h);
    }
}

static REAL *FN(take)(Arena *arena, int64_t count)
{
    return (REAL *)arena_take(arena, count * (int64_t)sizeof(REAL));
}

/* Reserve what a segment keeps for n rows and prepare its weights in their read layouts. */
CLONES static void FN(prepare)(const Record *rec, const double *k, Saved *sv, int64_t n, Arena *arena)
{
    int64_t d = rec->dim, h = rec->hidden;
    memset(sv, 0, sizeof *sv);
    if (rec->op == OP_COUPLING) {
        int64_t nk = (d - rec->parity + 1) / 2, nf = d - nk;
        /* Room for the piece tables' sort and sums, reused by both nets. */
        FN(Cut) *order = (FN(Cut) *)arena_take(arena, h * (int64_t)sizeof(FN(Cut)));
        double *tables = (double *)arena_take(arena, 2 * h * (int64_t)sizeof(double));
        for (int net = 0; net < 2; net++) {
            sv->w1k[net] = FN(take)(arena, nk * h);
            sv->w2t[net] = FN(take)(arena, h * h);
            sv->h2[net] = FN(take)(arena, n * h);
            if (nk == 1) {
                sv->A[net] = FN(take)(arena, (h + 1) * h);
                sv->B[net] = FN(take)(arena, (h + 1) * h);
                sv->cuts[net] = FN(take)(arena, h);
                sv->rank[net] = (int32_t *)arena_take(arena, h * (int64_t)sizeof(int32_t));
                sv->piece[net] = (int32_t *)arena_take(arena, n * (int64_t)sizeof(int32_t));
            } else {
                sv->h1[net] = FN(take)(arena, n * h);
            }
            if (!arena->base)
                continue;
            const REAL *w1 = (const REAL *)rec->value[net * 6 + 0];
            const REAL *w2 = (const REAL *)rec->value[net * 6 + 2];
            for (int64_t kk = 0; kk < nk; kk++)
                for (int64_t o = 0; o < h; o++)
                    sv->w1k[net][kk * h + o] = w1[o * d + rec->parity + 2 * kk];
            FN(transpose)(w2, h, h, h, sv->w2t[net]);
            if (nk == 1)
                FN(pieces)(rec, net, (REAL)k[0], sv, order, tables, tables + h);
        }
        sv->s = FN(take)(arena, n * nf);
        sv->e = FN(take)(arena, n * nf);
    } else if (rec->op == OP_BATCHNORM) {
        sv->mean = FN(take)(arena, d);
        sv->inv_std = FN(take)(arena, d);
    } else {
        sv->u_hat = FN(take)(arena, d);
        sv->tanh_a = FN(take)(arena, n);
        if (!arena->base)
            return;
        const REAL *w = (const REAL *)rec->value[0], *u = (const REAL *)rec->value[1];
        /* Sums over the coordinates in double, so that wide layers stay accurate. */
        double wu_sum = 0, ww_sum = 0;
        for (int64_t c = 0; c < d; c++) {
            wu_sum += (double)w[c] * u[c];
            ww_sum += (double)w[c] * w[c];
        }
        REAL wu = (REAL)wu_sum, ww = (REAL)ww_sum;
        /* softplus as torch computes it: the identity above 20. */
        REAL softplus = wu > 20 ? wu : FN(log1p)(R_EXP(wu));
        REAL coef = (softplus - 1 - wu) / ww;
        double c_sum = 0;
        for (int64_t c = 0; c < d; c++) {
            sv->u_hat[c] = u[c] + coef * w[c];
            c_sum += (double)w[c] * sv->u_hat[c];
        }
        sv->c = (REAL)c_sum;
        sv->wu = wu;
        sv->ww = ww;
        sv->coef = coef;
    }
}

/* y = coupling(x) for n rows; adds each row's log-det to log_det. */
CLONES static void FN(coupling_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n)
{
    int64_t d = rec->dim, h = rec->hidden, parity = rec->parity;
    int64_t nk = (d - parity + 1) / 2, nf = d - nk;
    REAL slope = (REAL)k[0];
    REAL out[2];

    for (int net = 0; net < 2; net++) {
        if (nk == 1) {
            FN(scalar_hidden)(rec, net, slope, sv, x, n);
            continue;
        }
        const REAL *b1 = (const REAL *)rec->value[net * 6 + 1];
        REAL *h1 = sv->h1[net];
        for (int64_t i = 0; i < n; i++) {
            REAL *row = h1 + i * h;
            for (int64_t o = 0; o < h; o++)
                row[o] = b1[o];
            for (int64_t kk = 0; kk < nk; kk++) {
                REAL xi = x[i * d + parity + 2 * kk];
                const REAL *w = sv->w1k[net] + kk * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += xi * w[o];
            }
            for (int64_t o = 0; o < h; o++)
                row[o] = row[o] > 0 ? row[o] : row[o] * slope;
        }
        const REAL *b2 = (const REAL *)rec->value[net * 6 + 3];
        FN(gemm)(BIAS_LEAKY, n, h, h, h1, h, 1, sv->w2t[net], h, sv->h2[net], h, b2, slope, NULL);
    }

    const REAL *w3s = (const REAL *)rec->value[4], *b3s = (const REAL *)rec->value[5];
    const REAL *w3t = (const REAL *)rec->value[10], *b3t = (const REAL *)rec->value[11];
    for (int64_t i = 0; i < n; i++) {
        const REAL *xi = x + i * d;
        REAL *yi = y + i * d;
        REAL sum = 0;
        for (int64_t c = parity; c < d; c += 2)
            yi[c] = xi[c];
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            out[0] = b3s[j] + FN(dot)(sv->h2[0] + i * h, w3s + j * h, h);
            out[1] = b3t[j] + FN(dot)(sv->h2[1] + i * h, w3t + j * h, h);
            REAL s = R_TANH(out[0]);
            REAL e = R_EXP(s);
            yi[j] = xi[j] * e + out[1];
            sv->s[i * nf + jj] = s;
            sv->e[i * nf + jj] = e;
            sum += s;
        }
        log_det[i] += sum;
    }
}


static void FN(reserve_scratch)(
    const Record *program, int64_t segments, int64_t n, Scratch *scratch, Arena *arena)
{
    int64_t d = program[0].dim, h = 0;
    for (int64_t s = 0; s < segments; s++)
        if (program[s].op == OP_COUPLING && program[s].hidden > h)
            h = program[s].hidden;
    scratch->g_out = FN(take)(arena, 2 * n * d);
    scratch->g_a2 = FN(take)(arena, n * h);
    scratch->g_a1 = FN(take)(arena, n * h);
    scratch->g_w1k = FN(take)(arena, d * h);
    scratch->sums = (double *)arena_take(arena, 2 * (h + 2) * h * (int64_t)sizeof(double));
    scratch->G = FN(take)(arena, h);
    scratch->Gx = FN(take)(arena, h);
    scratch->g_u_hat = (double *)arena_take(arena, d * (int64_t)sizeof(double));
    scratch->g_weight = (double *)arena_take(arena, d * (int64_t)sizeof(double));
}

/* Given g_y, the gradient of the loss in y, and g_ld, its derivative in every row's log-det:
 * write the parameter gradients and g_x, the gradient in x (g_x may not alias g_y). */
CLONES static void FN(coupling_backward)(
    const Record *rec, const double *k, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x,
    int64_t n, const Scratch *scratch)
{
    int64_t d = rec->dim, h = rec->hidden, parity = rec->parity;
    int64_t nk = (d - parity + 1) / 2, nf = d - nk;
    REAL slope = (REAL)k[0];
    const REAL *x = sv->x;
    REAL *g_out = scratch->g_out, *g_a2 = scratch->g_a2, *g_a1 = scratch->g_a1;
    REAL *g_w1k = scratch->g_w1k;

    /* The output layer: y_j = x_j e^s + t, log-det sum of s, s = tanh(out_s), t = out_t. */
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = parity; c < d; c += 2)
            g_x[i * d + c] = g_y[i * d + c];
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            REAL s = sv->s[i * nf + jj], gy = g_y[i * d + j];
            REAL g_xj = gy * sv->e[i * nf + jj];
            REAL g_s = g_xj * x[i * d + j] + g_ld;
            g_out[i * nf + jj] = g_s * (1 - s * s);
            g_out[n * nf + i * nf + jj] = gy;
            g_x[i * d + j] = g_xj;
        }
    }

    for (int net = 0; net < 2; net++) {
        const REAL *go = g_out + net * n * nf;
        const REAL *w2 = (const REAL *)rec->value[net * 6 + 2];
        const REAL *w3 = (const REAL *)rec->value[net * 6 + 4];
        REAL *gw1 = (REAL *)rec->grad[net * 6 + 0], *gb1 = (REAL *)rec->grad[net * 6 + 1];
        REAL *gw2 = (REAL *)rec->grad[net * 6 + 2], *gb2 = (REAL *)rec->grad[net * 6 + 3];
        REAL *gw3 = (REAL *)rec->grad[net * 6 + 4], *gb3 = (REAL *)rec->grad[net * 6 + 5];
        const REAL *h1 = sv->h1[net], *h2 = sv->h2[net];

        /* Last layer: only the free rows of W3 and b3 reach the output. */
        memset(gw3, 0, (size_t)(d * h) * sizeof(REAL));
        memset(gb3, 0, (size_t)d * sizeof(REAL));
        for (int64_t jj = 0; jj < nf; jj++) {
            int64_t j = 1 - parity + 2 * jj;
            REAL *row = gw3 + j * h;
            REAL bias = 0;
            for (int64_t i = 0; i < n; i++) {
                REAL g = go[i * nf + jj];
                const REAL *hi = h2 + i * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += g * hi[o];
                bias += g;
            }
            gb3[j] = bias;
        }

        /* Through W3 and the second leaky ReLU. */
        memset(gb2, 0, (size_t)h * sizeof(REAL));
        for (int64_t i = 0; i < n; i++) {
            REAL *gi = g_a2 + i * h;
            const REAL *hi = h2 + i * h;
            for (int64_t o = 0; o < h; o++)
                gi[o] = 0;
            for (int64_t jj = 0; jj < nf; jj++) {
                REAL g = go[i * nf + jj];
                const REAL *w = w3 + (1 - parity + 2 * jj) * h;
                for (int64_t o = 0; o < h; o++)
                    gi[o] += g * w[o];
            }
            for (int64_t o = 0; o < h; o++) {
                gi[o] = hi[o] > 0 ? gi[o] : gi[o] * slope;
                gb2[o] += gi[o];
            }
        }

        if (nk == 1) {
            FN(scalar_backward)(rec, net, slope, sv, g_a2, g_x, n, scratch);
            continue;
        }

        /* W2's gradient, and through W2 and the first leaky ReLU. */
        FN(gemm)(PLAIN, h, h, n, g_a2, 1, h, h1, h, gw2, h, NULL, slope, NULL);
        FN(gemm)(LEAKY_GRAD, n, h, h, g_a2, h, 1, w2, h, g_a1, h, NULL, slope, h1);

        /* First layer: only its kept columns read the input. */
        memset(gb1, 0, (size_t)h * sizeof(REAL));
        memset(g_w1k, 0, (size_t)(nk * h) * sizeof(REAL));
        for (int64_t i = 0; i < n; i++) {
            const REAL *gi = g_a1 + i * h;
            for (int64_t o = 0; o < h; o++)
                gb1[o] += gi[o];
            for (int64_t kk = 0; kk < nk; kk++) {
                REAL xi = x[i * d + parity + 2 * kk];
                REAL *row = g_w1k + kk * h;
                for (int64_t o = 0; o < h; o++)
                    row[o] += gi[o] * xi;
                g_x[i * d + parity + 2 * kk] += FN(dot)(gi, sv->w1k[net] + kk * h, h);
            }
        }
        memset(gw1, 0, (size_t)(h * d) * sizeof(REAL));
        for (int64_t kk = 0; kk < nk; kk++)
            for (int64_t o = 0; o < h; o++)
                gw1[o * d + parity + 2 * kk] = g_w1k[kk * h + o];
    }
}

/* torch's lerp: start + w (end - start), or end - (1 - w)(end - start) for w of 1/2 or more. */
static inline REAL FN(lerp)(REAL start, REAL end, REAL w)
{
    return w < (REAL)0.5 ? start + w * (end - start) : end - (end - start) * (1 - w);
}

/* Batch norm forward; in training mode with batch statistics, which it records. */
CLONES static void FN(batchnorm_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n, int training)
{
    int64_t d = rec->dim;
    REAL momentum = (REAL)k[1], eps = (REAL)k[2];
    const REAL *log_gamma = (const REAL *)rec->value[0], *beta = (const REAL *)rec->value[1];
    REAL *running_mean = (REAL *)rec->buffer[0], *running_var = (REAL *)rec->buffer[1];
    REAL *batch_mean = (REAL *)rec->buffer[2], *batch_var = (REAL *)rec->buffer[3];
    REAL total = 0;

    for (int64_t c = 0; c < d; c++) {
        REAL mean, var;
        if (training) {
            double sum = 0, squares = 0;
            for (int64_t i = 0; i < n; i++)
                sum += x[i * d + c];
            mean = (REAL)(sum / n);
            for (int64_t i = 0; i < n; i++) {
                double centred = (double)x[i * d + c] - (double)mean;
                squares += centred * centred;
            }
            var = (REAL)(squares / n);
            batch_mean[c] = mean;
            batch_var[c] = var;
            running_mean[c] = FN(lerp)(running_mean[c], mean, momentum);
            running_var[c] = FN(lerp)(running_var[c], var, momentum);
        } else {
            mean = running_mean[c];
            var = running_var[c];
        }
        REAL log_scale = log_gamma[c] - (REAL)0.5 * R_LOG(var + eps);
        REAL scale = R_EXP(log_scale);
        sv->mean[c] = mean;
        sv->inv_std[c] = 1 / R_SQRT(var + eps);
        for (int64_t i = 0; i < n; i++)
            y[i * d + c] = (x[i * d + c] - mean) * scale + beta[c];
        total += log_scale;
    }
    for (int64_t i = 0; i < n; i++)
        log_det[i] += total;
}

CLONES static void FN(batchnorm_backward)(
    const Record *rec, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x, int64_t n,
    int training)
{
    int64_t d = rec->dim;
    const REAL *log_gamma = (const REAL *)rec->value[0];
    REAL *g_log_gamma = (REAL *)rec->grad[0], *g_beta = (REAL *)rec->grad[1];
    const REAL *x = sv->x;
    REAL total_ld = g_ld * (REAL)n;

    for (int64_t c = 0; c < d; c++) {
        REAL mean = sv->mean[c], inv_std = sv->inv_std[c], gamma = R_EXP(log_gamma[c]);
        double sum_g = 0, sum_gx = 0;
        for (int64_t i = 0; i < n; i++) {
            REAL g = g_y[i * d + c];
            sum_g += g;
            sum_gx += g * ((x[i * d + c] - mean) * inv_std);
        }
        g_beta[c] = (REAL)sum_g;
        g_log_gamma[c] = (REAL)sum_gx * gamma + total_ld;

        if (!training) {
            for (int64_t i = 0; i < n; i++)
                g_x[i * d + c] = g_y[i * d + c] * gamma * inv_std;
            continue;
        }
        /* The batch mean and variance depend on every row, and so does the log-det. */
        REAL mean_g = (REAL)(sum_g / n) * gamma;
        REAL centred = (REAL)(sum_gx / n) * gamma + total_ld / (REAL)n;
        for (int64_t i = 0; i < n; i++) {
            REAL x_hat = (x[i * d + c] - mean) * inv_std;
            g_x[i * d + c] = inv_std * (g_y[i * d + c] * gamma - mean_g - x_hat * centred);
        }
    }
}

CLONES static void FN(planar_forward)(
    const Record *rec, Saved *sv, const REAL *x, REAL *y, REAL *log_det, int64_t n)
{
    int64_t d = rec->dim;
    const REAL *w = (const REAL *)rec->value[0];
    REAL b = ((const REAL *)rec->value[2])[0];

    for (int64_t i = 0; i < n; i++) {
        const REAL *xi = x + i * d;
        REAL *yi = y + i * d;
        double a = b;
        for (int64_t c = 0; c < d; c++)
            a += (double)xi[c] * w[c];
        REAL t = R_TANH((REAL)a);
        for (int64_t c = 0; c < d; c++)
            yi[c] = xi[c] + sv->u_hat[c] * t;
        sv->tanh_a[i] = t;
        log_det[i] += FN(log1p)((1 - t * t) * sv->c);
    }
}

CLONES static void FN(planar_backward)(
    const Record *rec, const Saved *sv, const REAL *g_y, REAL g_ld, REAL *g_x, int64_t n,
    const Scratch *scratch)
{
    int64_t d = rec->dim;
    const REAL *w = (const REAL *)rec->value[0], *u = (const REAL *)rec->value[1];
    REAL *g_w = (REAL *)rec->grad[0], *g_u = (REAL *)rec->grad[1], *g_b = (REAL *)rec->grad[2];
    const REAL *x = sv->x, *u_hat = sv->u_hat;
    REAL c = sv->c;
    double g_c = 0, g_bias = 0;
    double *g_u_hat = scratch->g_u_hat, *g_weight = scratch->g_weight;

    for (int64_t e = 0; e < d; e++)
        g_u_hat[e] = g_weight[e] = 0;
    /* log_det = log(1 + q c) with q = 1 - tanh(a)^2, a = w^T x + b. */
    for (int64_t i = 0; i < n; i++) {
        const REAL *gi = g_y + i * d, *xi = x + i * d;
        REAL t = sv->tanh_a[i], q = 1 - t * t, denominator = 1 + q * c;
        double g_t = -2 * g_ld * t * c / denominator;
        g_c += g_ld * q / denominator;
        for (int64_t e = 0; e < d; e++)
            g_t += (double)gi[e] * u_hat[e];
        REAL g_a = (REAL)g_t * q;
        for (int64_t e = 0; e < d; e++) {
            g_x[i * d + e] = gi[e] + g_a * w[e];
            g_u_hat[e] += t * gi[e];
            g_weight[e] += g_a * xi[e];
        }
        g_bias += g_a;
    }

    /* u_hat = u + coef w, coef = (softplus(wu) - 1 - wu) / ww, and c = w^T u_hat. */
    double g_coef = 0;
    for (int64_t e = 0; e < d; e++) {
        g_u_hat[e] += g_c * w[e];
        g_weight[e] += g_c * u_hat[e];
        g_coef += g_u_hat[e] * w[e];
    }
    REAL sigmoid = 1 / (1 + R_EXP(-sv->wu));
    REAL g_wu = (REAL)g_coef * (sigmoid - 1) / sv->ww;
    REAL g_ww = -(REAL)g_coef * sv->coef / sv->ww;
    for (int64_t e = 0; e < d; e++) {
        REAL g_hat = (REAL)g_u_hat[e];
        g_w[e] = (REAL)g_weight[e] + sv->coef * g_hat + g_wu * u[e] + 2 * g_ww * w[e];
        g_u[e] = g_hat + g_wu * w[e];
    }
    g_b[0] = (REAL)g_bias;
}

/* One segment forward: y and the log-dets from x. */
static void FN(segment_forward)(
    const Record *rec, const double *k, Saved *sv, const REAL *x, REAL *y, REAL *log_det,
    int64_t n, int training)
{
    sv->x = (REAL *)x;
    if (rec->op == OP_COUPLING)
        FN(coupling_forward)(rec, k, sv, x, y, log_det, n);
    else if (rec->op == OP_BATCHNORM)
        FN(batchnorm_forward)(rec, k, sv, x, y, log_det, n, training);
    else
        FN(planar_forward)(rec, sv, x, y, log_det, n);
}

/* log p(x) = log N(z; 0, I) + log-det, per row. */
static void FN(finish)(const REAL *z, const REAL *log_det, REAL *log_p, int64_t n, int64_t d)
{
    REAL constant = (REAL)(0.5 * (double)d * log(2.0 * M_PI));
    for (int64_t i = 0; i < n; i++) {
        double squares = 0;
        for (int64_t c = 0; c < d; c++)
            squares += (double)z[i * d + c] * z[i * d + c];
        log_p[i] = -(REAL)(0.5 * squares) - constant + log_det[i];
    }
}

/* The log-density of n rows, in blocks of BLOCK rows that keep the activations in cache. */
CLONES static int64_t FN(log_prob)(
    const Record *program, const double *constants, int64_t segments, const REAL *x, int64_t n,
    REAL *log_p, void *workspace, int64_t workspace_bytes, int training)
{
    int64_t d = program[0].dim;
    int64_t block = training ? n : (n < BLOCK ? n : BLOCK);
    Arena arena = {workspace, 0, workspace_bytes};
    Saved *saved = (Saved *)arena_take(&arena, segments * (int64_t)sizeof(Saved));
    REAL *log_det = FN(take)(&arena, block);
    REAL *ping = FN(take)(&arena, block * d), *pong = FN(take)(&arena, block * d);
    Saved measuring;
    for (int64_t s = 0; s < segments; s++)
        FN(prepare)(&program[s], constants + 3 * s, workspace ? &saved[s] : &measuring, block,
                    &arena);
    if (!workspace)
        return arena.used;

    for (int64_t start = 0; start < n; start += block) {
        int64_t rows = n - start < block ? n - start : block;
        const REAL *in = x + start * d;
        memset(log_det, 0, (size_t)rows * sizeof(REAL));
        for (int64_t s = 0; s < segments; s++) {
            REAL *out = s % 2 ? pong : ping;
            FN(segment_forward)(
                &program[s], constants + 3 * s, &saved[s], in, out, log_det, rows, training);
            in = out;
        }
        FN(finish)(in, log_det, log_p + start, rows, d);
    }
    return arena.used;
}

/* The mean negative log-likelihood of n rows, its gradient written to every parameter's grad,
 * then clipped to norm clip. Returns the workspace bytes it needs when workspace is NULL. */
CLONES static int64_t FN(loss_backward)(
    const Record *program, const double *constants, int64_t segments, const REAL *x, int64_t n,
    void *workspace, int64_t workspace_bytes, int training, double clip, double *result)
{
    int64_t d = program[0].dim;
    Arena arena = {workspace, 0, workspace_bytes};
    Saved *saved = (Saved *)arena_take(&arena, segments * (int64_t)sizeof(Saved));
    REAL *log_det = FN(take)(&arena, n);
    REAL *log_p = FN(take)(&arena, n);
    REAL *stages = FN(take)(&arena, segments * n * d);
    REAL *g = FN(take)(&arena, n * d), *g_next = FN(take)(&arena, n * d);
    Scratch scratch;
    FN(reserve_scratch)(program, segments, n, &scratch, &arena);
    Saved measuring;
    for (int64_t s = 0; s < segments; s++)
        FN(prepare)(&program[s], constants + 3 * s, workspace ? &saved[s] : &measuring, n,
                    &arena);
    if (!workspace)
        return arena.used;

    /* Forward, keeping every stage. */
    memset(log_det, 0, (size_t)n * sizeof(REAL));
    const REAL *in = x;
    for (int64_t s = 0; s < segments; s++) {
        REAL *out = stages + s * n * d;
        FN(segment_forward)(
            &program[s], constants + 3 * s, &saved[s], in, out, log_det, n, training);
        in = out;
    }
    FN(finish)(in, log_det, log_p, n, d);
    double total = 0;
    for (int64_t i = 0; i < n; i++)
        total += log_p[i];
    result[0] = -total / (double)n;

    /* Backward from the loss -mean(log p): its gradient in z is z / n, in each log-det -1 / n. */
    for (int64_t i = 0; i < n * d; i++)
        g[i] = in[i] / (REAL)n;
    REAL g_ld = -(REAL)1 / (REAL)n;
    for (int64_t s = segments - 1; s >= 0; s--) {
        const Record *rec = &program[s];
        if (rec->op == OP_COUPLING)
            FN(coupling_backward)(rec, constants + 3 * s, &saved[s], g, g_ld, g_next, n, &scratch);
        else if (rec->op == OP_BATCHNORM)
            FN(batchnorm_backward)(rec, &saved[s], g, g_ld, g_next, n, training);
        else
            FN(planar_backward)(rec, &saved[s], g, g_ld, g_next, n, &scratch);
        REAL *swap = g;
        g = g_next;
        g_next = swap;
    }

    /* The gradient's norm, then clipping as torch.nn.utils.clip_grad_norm_ does. */
    double squares = 0;
    for (int64_t s = 0; s < segments; s++)
        for (int p = 0; p < PARAMETERS; p++)
            if (program[s].grad[p])
                for (int64_t e = 0; e < program[s].numel[p]; e++) {
                    double v = ((const REAL *)program[s].grad[p])[e];
                    squares += v * v;
                }
    double norm = sqrt(squares);
    result[1] = norm;
    REAL factor = (REAL)(clip / (norm + 1e-6));
    if (factor < 1)
        for (int64_t s = 0; s < segments; s++)
            for (int p = 0; p < PARAMETERS; p++)
                if (program[s].grad[p])
                    for (int64_t e = 0; e < program[s].numel[p]; e++)
                        ((REAL *)program[s].grad[p])[e] *= factor;
    return arena.used;
}

/* One Adam step with decoupled weight decay, as torch.optim.Adam(decoupled_weight_decay=True)
 * computes it: the moments move towards the gradient and its square, and the parameters take
 * the bias-corrected step. step counts this one. */
CLONES static void FN(adam)(
    REAL *param, const REAL *grad, REAL *exp_avg, REAL *exp_avg_sq, int64_t numel, int64_t step,
    double lr, double beta1, double beta2, double eps, double weight_decay)
{
    double correction1 = 1.0 - pow(beta1, (double)step);
    double correction2 = 1.0 - pow(beta2, (double)step);
    REAL decay = (REAL)(1.0 - lr * weight_decay), step_size = (REAL)(lr / correction1);
    REAL root2 = (REAL)sqrt(correction2), e = (REAL)eps;
    REAL keep2 = (REAL)beta2, take1 = (REAL)(1.0 - beta1), take2 = (REAL)(1.0 - beta2);

    for (int64_t i = 0; i < numel; i++) {
        REAL g = grad[i];
        REAL m = exp_avg[i] + take1 * (g - exp_avg[i]);
        REAL v = keep2 * exp_avg_sq[i] + take2 * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = param[i] * decay - step_size * m / (R_SQRT(v) / root2 + e);
    }
}

#undef Saved
#undef Scratch
#undef VEC
#undef MASK
#undef NR
#undef FN
